/*
 * Socket duplication across processes (spec 4.8, DUP-1..3), through the C ABI only: three
 * processes of this program, each a switch with its own provider on the shm fabric, each
 * owning one address (SANPATH_CONFIG names its configuration).
 *
 * Usage: dup_xproc <path to libsanpath_ffi.so> peer|source|target
 *
 *   peer   (198.18.0.2) listens on port 7000, accepts, posts a receive, and expects the
 *          target's "dup!" in it (DUP-2: the receive posted before the duplication gets the
 *          new socket's message); then sends "back".
 *   source (198.18.0.1) connects to the peer, posts a receive, duplicates the socket for the
 *          target's pid: the receive completes with success and 0 bytes (DUP-1), the value is
 *          non-zero, and the old descriptor stays valid until closed (DUP-3).
 *   target (198.18.0.3) makes a socket from the value (DUP-2), which a second claim refuses,
 *          sends "dup!" and receives "back": the same connection, now in this process.
 *
 * The test driving the three (ffi/tests/c_dup_xproc.rs) passes messages between them: each
 * process prints lines on stdout ("READY", "PID <n>", "TOKEN <n>", ...) and reads lines on
 * stdin. Every wait is bounded; alarm() ends a process that hangs regardless, and one whose
 * stdin closes (the driver gone) exits. Prints "N passed, M failed" on stderr and exits
 * non-zero on any failure.
 */
#define _POSIX_C_SOURCE 200809L
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "sanpath.h"

#include "check.h"
#include "provider.h"

#define WAIT_SECS 10.0
#define HANDLE_BASE ((SOCKET)0x5B000000u)
#define MAX_HANDLES 64
#define MAX_DONE 256
#define PORT 7000
#define IP(a, b, c, d) (((uint32_t)(a) << 24) | ((uint32_t)(b) << 16) | ((uint32_t)(c) << 8) | (uint32_t)(d))
#define PEER_IP IP(198, 18, 0, 2)

/* ---- The switch: handles and completion upcalls ---- */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int handle_count, closed_count, violations;
struct done {
    WSAOVERLAPPED *ov;
    DWORD error, bytes;
};
static struct done dones[MAX_DONE];
static int done_count;

static SOCKET up_create(DWORD catalog, DWORD_PTR context, INT *err) {
    (void)context;
    pthread_mutex_lock(&lock);
    if (catalog != CATALOG_ID || handle_count == MAX_HANDLES) {
        pthread_mutex_unlock(&lock);
        *err = WSAENOBUFS;
        return INVALID_SOCKET;
    }
    SOCKET h = HANDLE_BASE + (SOCKET)handle_count++;
    pthread_mutex_unlock(&lock);
    return h;
}

static INT up_close(SOCKET s, INT *err) {
    (void)s;
    (void)err;
    pthread_mutex_lock(&lock);
    closed_count++;
    pthread_mutex_unlock(&lock);
    return 0;
}

static INT up_query(SOCKET s, DWORD_PTR *ctx, INT *err) {
    (void)s;
    (void)ctx;
    *err = WSAENOTSOCK;
    return SOCKET_ERROR;
}

static INT up_complete(SOCKET s, WSAOVERLAPPED *ov, DWORD error, DWORD bytes, INT *err) {
    (void)s;
    (void)err;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < done_count; i++) {
        if (dones[i].ov == ov) {
            fprintf(stderr, "VIOLATION: a second completion upcall for one op\n");
            violations++;
        }
    }
    if (done_count < MAX_DONE) {
        struct done d = {ov, error, bytes};
        dones[done_count++] = d;
    }
    ov->InternalHigh = bytes;
    __atomic_store_n(&ov->Internal, (ULONG_PTR)error, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&lock);
    return 0;
}

static BOOL u_close_event(WSAEVENT h, INT *e) { (void)h; (void)e; return FALSE; }
static WSAEVENT u_create_event(INT *e) { (void)e; return NULL; }
static INT u_fd_isset(SOCKET s, FD_SET *f) { (void)s; (void)f; return 0; }
static INT u_provider_path(GUID *g, WCHAR *p, INT *l, INT *e) { (void)g; (void)p; (void)l; (void)e; return SOCKET_ERROR; }
static SOCKET u_modify_ifs(DWORD c, SOCKET s, INT *e) { (void)c; (void)s; (void)e; return INVALID_SOCKET; }
static BOOL u_post_message(HWND h, UINT m, WPARAM w, LPARAM l) { (void)h; (void)m; (void)w; (void)l; return FALSE; }
static INT u_blocking_cb(DWORD c, LPBLOCKINGCALLBACK *cb, DWORD_PTR *ctx, INT *e) { (void)c; (void)cb; (void)ctx; (void)e; return SOCKET_ERROR; }
static INT u_queue_apc(WSATHREADID *t, LPWSAUSERAPC f, DWORD_PTR c, INT *e) { (void)t; (void)f; (void)c; (void)e; return SOCKET_ERROR; }
static BOOL u_reset_event(WSAEVENT h, INT *e) { (void)h; (void)e; return FALSE; }
static BOOL u_set_event(WSAEVENT h, INT *e) { (void)h; (void)e; return FALSE; }
static INT u_open_thread(WSATHREADID *t, INT *e) { (void)t; (void)e; return SOCKET_ERROR; }
static INT u_close_thread(WSATHREADID *t, INT *e) { (void)t; (void)e; return SOCKET_ERROR; }

static WSPUPCALLTABLEEX upcall_table(void) {
    WSPUPCALLTABLEEX t;
    t.lpWPUCloseEvent = u_close_event;
    t.lpWPUCloseSocketHandle = up_close;
    t.lpWPUCreateEvent = u_create_event;
    t.lpWPUCreateSocketHandle = up_create;
    t.lpWPUFDIsSet = u_fd_isset;
    t.lpWPUGetProviderPath = u_provider_path;
    t.lpWPUModifyIFSHandle = u_modify_ifs;
    t.lpWPUPostMessage = u_post_message;
    t.lpWPUQueryBlockingCallback = u_blocking_cb;
    t.lpWPUQuerySocketHandleContext = up_query;
    t.lpWPUQueueApc = u_queue_apc;
    t.lpWPUResetEvent = u_reset_event;
    t.lpWPUSetEvent = u_set_event;
    t.lpWPUOpenCurrentThread = u_open_thread;
    t.lpWPUCloseThread = u_close_thread;
    t.lpWPUCompleteOverlappedRequest = up_complete;
    return t;
}

/* How many completion upcalls `ov` got; its last one in `*out`. */
static int completions(WSAOVERLAPPED *ov, struct done *out) {
    int n = 0;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < done_count; i++) {
        if (dones[i].ov == ov) {
            *out = dones[i];
            n++;
        }
    }
    pthread_mutex_unlock(&lock);
    return n;
}

/* Waits (bounded) for the completion upcall of `ov`. */
static struct done wait_done(WSAOVERLAPPED *ov, const char *what) {
    struct done d = {NULL, 0, 0};
    double deadline = now() + WAIT_SECS;
    while (completions(ov, &d) == 0 && now() < deadline) sleep_ms(1);
    REQUIRE(d.ov == ov, "%s: no completion upcall within %.0f s", what, WAIT_SECS);
    return d;
}

/* ---- The library ---- */

static WSPPROC_TABLE P;
static event_create_fn ev_create;
static event_op_fn ev_close;
static event_wait_fn ev_wait;
static LPFN_WSPREGISTERMEMORY RegisterMemory;

static void start(const char *path) {
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    REQUIRE(lib != NULL, "dlopen: %s", dlerror());
    LPWSPSTARTUPEX startup;
    LOAD(startup, lib, "WSPStartupEx");
    LOAD(ev_create, lib, "sanpath_event_create");
    LOAD(ev_close, lib, "sanpath_event_close");
    LOAD(ev_wait, lib, "sanpath_event_wait");
    WSPDATA data;
    WSAPROTOCOL_INFOW pi = tcp_info();
    WSPUPCALLTABLEEX up = upcall_table();
    REQUIRE(startup(0x0202, &data, &pi, &up, &P) == 0, "WSPStartupEx (is SANPATH_CONFIG an shm config?)");
}

static SOCKET new_socket(DWORD reserved, INT *err) {
    WSAPROTOCOL_INFOW pi = tcp_info();
    pi.dwProviderReserved = reserved;
    return P.lpWSPSocket(AF_INET, SOCK_STREAM, IPPROTO_TCP, &pi, 0, WSA_FLAG_OVERLAPPED, err);
}

static void load_register(SOCKET s) {
    GUID g = WSAID_REGISTERMEMORY;
    void *fn = NULL;
    DWORD ret = 0;
    INT err = 0;
    REQUIRE(P.lpWSPIoctl(s, SIO_GET_EXTENSION_FUNCTION_POINTER, &g, sizeof g, &fn, sizeof fn, &ret, NULL, NULL,
                         NULL, &err) == 0,
            "WSPRegisterMemory pointer %d", err);
    memcpy(&RegisterMemory, &fn, sizeof fn);
}

static SOCKADDR_IN sin_of(uint32_t ip, uint16_t port) {
    SOCKADDR_IN a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = (uint16_t)((port >> 8) | (port << 8));
    a.sin_addr.s_addr = (ip >> 24) | ((ip >> 8) & 0xFF00u) | ((ip << 8) & 0xFF0000u) | (ip << 24);
    return a;
}

static WSAOVERLAPPED fresh_ov(void) {
    WSAOVERLAPPED ov;
    memset(&ov, 0, sizeof ov);
    return ov;
}

/* Posts a receive of up to `len` bytes into `buf`. */
static void post_recv(SOCKET s, char *buf, ULONG len, WSAOVERLAPPED *ov, const char *what) {
    WSABUF b = {len, buf};
    DWORD n = 0, flags = 0;
    INT err = 0;
    CHECK(P.lpWSPRecv(s, &b, 1, &n, &flags, ov, NULL, NULL, &err) == SOCKET_ERROR && err == WSA_IO_PENDING,
          "%s: WSPRecv %d", what, err);
}

/* Sends `msg` and waits for the send's completion. */
static void send_msg(SOCKET s, char *buf, const char *msg, const char *what) {
    size_t len = strlen(msg);
    memcpy(buf, msg, len);
    WSABUF b = {(ULONG)len, buf};
    WSAOVERLAPPED ov = fresh_ov();
    DWORD n = 0;
    INT err = 0;
    CHECK(P.lpWSPSend(s, &b, 1, &n, 0, &ov, NULL, NULL, &err) == SOCKET_ERROR && err == WSA_IO_PENDING,
          "%s: WSPSend %d", what, err);
    struct done d = wait_done(&ov, what);
    CHECK(d.error == 0 && d.bytes == len, "%s: %u/%u", what, d.error, d.bytes);
}

/* ---- Lines to and from the driver ---- */

static void say(const char *word) {
    printf("%s\n", word);
    fflush(stdout);
}

static void say_num(const char *word, unsigned long v) {
    printf("%s %lu\n", word, v);
    fflush(stdout);
}

/* The next line from the driver; it must start with `word`. Returns the number after it. */
static unsigned long hear(const char *word) {
    char line[128];
    REQUIRE(fgets(line, sizeof line, stdin) != NULL, "stdin closed while waiting for %s", word);
    size_t n = strlen(word);
    REQUIRE(strncmp(line, word, n) == 0, "expected %s, got %s", word, line);
    return strtoul(line + n, NULL, 10);
}

/* ---- The roles ---- */

#define REGION 4096

static void peer(void) {
    INT err = 0;
    SOCKET L = new_socket(0, &err);
    REQUIRE(L != INVALID_SOCKET, "WSPSocket %d", err);
    SOCKADDR_IN a = sin_of(PEER_IP, PORT);
    REQUIRE(P.lpWSPBind(L, (const SOCKADDR *)&a, sizeof a, &err) == 0, "bind %d", err);
    REQUIRE(P.lpWSPListen(L, 4, &err) == 0, "listen %d", err);
    WSAEVENT ev = ev_create();
    REQUIRE(P.lpWSPEventSelect(L, ev, FD_ACCEPT, &err) == 0, "event select %d", err);
    say("READY");
    REQUIRE(ev_wait(ev, (DWORD)(WAIT_SECS * 1000)) == SANPATH_WAIT_SIGNALED, "no FD_ACCEPT");
    SOCKET S = P.lpWSPAccept(L, NULL, NULL, NULL, 0, &err);
    REQUIRE(S != INVALID_SOCKET, "accept %d", err);
    load_register(S);
    char *buf = calloc(1, REGION);
    REQUIRE(buf != NULL && RegisterMemory(S, buf, REGION, MEM_READWRITE, &err) != NULL, "register %d", err);
    WSAOVERLAPPED ovR = fresh_ov();
    post_recv(S, buf, 64, &ovR, "peer");
    say("ACCEPTED");
    /* DUP-2: the receive posted before the duplication gets the target's message, once. */
    struct done d = wait_done(&ovR, "the peer's receive");
    CHECK(d.error == 0 && d.bytes == 4 && memcmp(buf, "dup!", 4) == 0, "DUP-2 peer receive %u/%u %.4s", d.error,
          d.bytes, buf);
    send_msg(S, buf + 1024, "back", "the peer's send");
    say("ANSWERED");
    hear("EXIT");
    CHECK(completions(&ovR, &d) == 1, "DUP-2 one completion of the peer's receive");
    CHECK(P.lpWSPCloseSocket(S, &err) == 0, "close %d", err);
    CHECK(P.lpWSPCloseSocket(L, &err) == 0, "close %d", err);
    ev_close(ev);
    free(buf);
}

static void source(void) {
    INT err = 0;
    SOCKET C = new_socket(0, &err);
    REQUIRE(C != INVALID_SOCKET, "WSPSocket %d", err);
    WSAEVENT ev = ev_create();
    REQUIRE(P.lpWSPEventSelect(C, ev, FD_CONNECT, &err) == 0, "event select %d", err);
    SOCKADDR_IN a = sin_of(PEER_IP, PORT);
    int rc = P.lpWSPConnect(C, (const SOCKADDR *)&a, sizeof a, NULL, NULL, NULL, NULL, &err);
    REQUIRE(rc == 0 || err == WSAEWOULDBLOCK, "connect %d", err);
    REQUIRE(ev_wait(ev, (DWORD)(WAIT_SECS * 1000)) == SANPATH_WAIT_SIGNALED, "no FD_CONNECT");
    WSANETWORKEVENTS ne;
    REQUIRE(P.lpWSPEnumNetworkEvents(C, ev, &ne, &err) == 0 && (ne.lNetworkEvents & FD_CONNECT) &&
                ne.iErrorCode[FD_CONNECT_BIT] == 0,
            "connect result %d", ne.iErrorCode[FD_CONNECT_BIT]);
    load_register(C);
    char *buf = calloc(1, REGION);
    REQUIRE(buf != NULL && RegisterMemory(C, buf, REGION, MEM_READWRITE, &err) != NULL, "register %d", err);
    memset(buf, 0xEE, 64);
    WSAOVERLAPPED ovR = fresh_ov();
    post_recv(C, buf, 64, &ovR, "source");
    say("CONNECTED");
    DWORD target = (DWORD)hear("PID ");
    WSAPROTOCOL_INFOW pi = tcp_info();
    REQUIRE(P.lpWSPDuplicateSocket(C, target, &pi, &err) == 0, "WSPDuplicateSocket %d", err);
    /* DUP-1: the pending receive completed, once, with success and 0 bytes, by the return. */
    struct done d = {NULL, 0, 0};
    CHECK(completions(&ovR, &d) == 1 && d.error == 0 && d.bytes == 0, "DUP-1 pending receive %u/%u", d.error,
          d.bytes);
    CHECK((unsigned char)buf[0] == 0xEE, "DUP-1 nothing written");
    CHECK(pi.dwProviderReserved != 0, "DUP-1 dwProviderReserved is 0");
    say_num("TOKEN", (unsigned long)pi.dwProviderReserved);
    hear("EXIT");
    /* DUP-3: the old descriptor is still ours (not WSAENOTSOCK) until closed. */
    WSABUF b = {4, buf};
    DWORD n = 0;
    WSAOVERLAPPED ovS = fresh_ov();
    CHECK(P.lpWSPSend(C, &b, 1, &n, 0, &ovS, NULL, NULL, &err) == SOCKET_ERROR && err != WSAENOTSOCK &&
              err != WSA_IO_PENDING,
          "DUP-3 old descriptor %d", err);
    CHECK(P.lpWSPCloseSocket(C, &err) == 0, "DUP-3 close the old descriptor %d", err);
    ev_close(ev);
    free(buf);
}

static void target(void) {
    INT err = 0;
    say_num("PID", (unsigned long)getpid());
    DWORD token = (DWORD)hear("TOKEN ");
    SOCKET D = new_socket(token, &err);
    REQUIRE(D != INVALID_SOCKET, "DUP-2 WSPSocket with dwProviderReserved %d", err);
    CHECK(new_socket(token, &err) == INVALID_SOCKET && err == WSAEINVAL, "DUP-2 claimed twice %d", err);
    load_register(D);
    char *buf = calloc(1, REGION);
    REQUIRE(buf != NULL && RegisterMemory(D, buf, REGION, MEM_READWRITE, &err) != NULL, "register %d", err);
    WSAOVERLAPPED ovR = fresh_ov();
    post_recv(D, buf, 64, &ovR, "target");
    send_msg(D, buf + 1024, "dup!", "DUP-2 the target's send");
    struct done d = wait_done(&ovR, "the target's receive");
    CHECK(d.error == 0 && d.bytes == 4 && memcmp(buf, "back", 4) == 0, "DUP-2 target receive %u/%u %.4s", d.error,
          d.bytes, buf);
    say("DONE");
    hear("EXIT");
    CHECK(P.lpWSPCloseSocket(D, &err) == 0, "close %d", err);
    free(buf);
}

int main(int argc, char **argv) {
    REQUIRE(argc == 3, "usage: dup_xproc <libsanpath_ffi.so> peer|source|target");
    /* Whatever happens, this process does not outlive the test by much. */
    alarm(60);
    start(argv[1]);
    if (strcmp(argv[2], "peer") == 0) {
        peer();
    } else if (strcmp(argv[2], "source") == 0) {
        source();
    } else if (strcmp(argv[2], "target") == 0) {
        target();
    } else {
        REQUIRE(0, "unknown role %s", argv[2]);
    }
    INT err = 0;
    CHECK(P.lpWSPCleanup(&err) == 0, "WSPCleanup %d", err);
    pthread_mutex_lock(&lock);
    CHECK(closed_count == handle_count, "%d of %d switch handles closed", closed_count, handle_count);
    CHECK(violations == 0, "%d upcall rule violations", violations);
    pthread_mutex_unlock(&lock);
    fprintf(stderr, "dup_xproc %s: %d passed, %d failed\n", argv[2], passed, failed);
    return failed == 0 ? 0 : 1;
}
