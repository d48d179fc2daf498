/*
 * A WSD switch written in C, driving the sanpath provider through its C ABI only.
 *
 * Usage: switch <path to libsanpath_ffi.so>
 *
 * Loads the library with dlopen, calls WSPStartupEx, fetches the extension functions through
 * WSPIoctl, and on the soft fabric (one process, loopback to the provider's own address
 * 198.18.0.1) runs listen / connect / accept (with a condition function), memory registration,
 * send / recv, RDMA write and read, and close, checking the spec's checklist items from the
 * switch's side: START-1,2,4,5,6,7,8; EXT-1,3,4; SOCK-1,2,3,4,5; CONN-1,2,7,9,10,11,12,13;
 * MEM-1,4; RDMA-1,2,3,4; XFER-1..9; CLOSE-1,3..9; DUP-1..3 within this one process. Upcalls are recorded in a log so that their
 * order and count can be checked. Every wait is bounded.
 *
 * Prints "N passed, M failed" and exits non-zero on any failure.
 *
 * Note: sanpath.h defines the Windows values of AF_INET, SOL_SOCKET, ...; this file therefore
 * includes no Linux socket header.
 */
#define _POSIX_C_SOURCE 200809L
#include <dlfcn.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "sanpath.h"

/* ------------------------------------------------------------------------------------------ */
/* Checks                                                                                       */
/* ------------------------------------------------------------------------------------------ */

#include "check.h"
#include "provider.h"

#define WAIT_SECS 10.0

/* ------------------------------------------------------------------------------------------ */
/* The switch side: handles and the upcall log                                                 */
/* ------------------------------------------------------------------------------------------ */

enum { UP_CREATE = 1, UP_CLOSE, UP_QUERY, UP_COMPLETE };

struct upcall {
    int kind;
    SOCKET handle;
    WSAOVERLAPPED *ov;
    DWORD error;
    DWORD bytes;
};

struct handle_rec {
    SOCKET handle;
    DWORD_PTR context;
    int closed;
};

#define MAX_LOG 4096
#define MAX_HANDLES 256
#define HANDLE_BASE ((SOCKET)0x5A000000u)

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct upcall up_log[MAX_LOG];
static int up_count;
static struct handle_rec handles[MAX_HANDLES];
static int handle_count;
static int violations;         /* upcalls that broke a rule (reported at the end) */
static int unexpected_upcalls; /* upcalls a SAN provider never makes */
static int trap_calls;         /* calls through a table we overwrote after startup */

static void violation(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "VIOLATION: ");
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    violations++;
}

static void log_upcall(int kind, SOCKET h, WSAOVERLAPPED *ov, DWORD error, DWORD bytes) {
    if (up_count < MAX_LOG) {
        struct upcall u = {kind, h, ov, error, bytes};
        up_log[up_count++] = u;
    }
}

static struct handle_rec *find_handle(SOCKET h) {
    for (int i = 0; i < handle_count; i++) {
        if (handles[i].handle == h) return &handles[i];
    }
    return NULL;
}

static SOCKET WPUCreateSocketHandle(DWORD catalog, DWORD_PTR context, INT *err) {
    pthread_mutex_lock(&lock);
    if (catalog != CATALOG_ID) violation("WPUCreateSocketHandle: catalog id %u", catalog);
    if (handle_count == MAX_HANDLES) {
        pthread_mutex_unlock(&lock);
        *err = WSAENOBUFS;
        return INVALID_SOCKET;
    }
    SOCKET h = HANDLE_BASE + (SOCKET)handle_count;
    struct handle_rec r = {h, context, 0};
    handles[handle_count++] = r;
    log_upcall(UP_CREATE, h, NULL, 0, 0);
    pthread_mutex_unlock(&lock);
    return h;
}

static INT WPUCloseSocketHandle(SOCKET s, INT *err) {
    pthread_mutex_lock(&lock);
    struct handle_rec *r = find_handle(s);
    if (r == NULL || r->closed) {
        violation("WPUCloseSocketHandle(%#lx): %s", (unsigned long)s,
                  r == NULL ? "not a switch handle (SOCK-2)" : "closed twice (CLOSE-5)");
        pthread_mutex_unlock(&lock);
        *err = WSAENOTSOCK;
        return SOCKET_ERROR;
    }
    r->closed = 1;
    log_upcall(UP_CLOSE, s, NULL, 0, 0);
    pthread_mutex_unlock(&lock);
    return 0;
}

static INT WPUQuerySocketHandleContext(SOCKET s, DWORD_PTR *ctx, INT *err) {
    pthread_mutex_lock(&lock);
    struct handle_rec *r = find_handle(s);
    if (r == NULL || r->closed) {
        violation("WPUQuerySocketHandleContext(%#lx) on a bad handle", (unsigned long)s);
        pthread_mutex_unlock(&lock);
        *err = WSAENOTSOCK;
        return SOCKET_ERROR;
    }
    *ctx = r->context;
    log_upcall(UP_QUERY, s, NULL, 0, 0);
    pthread_mutex_unlock(&lock);
    return 0;
}

static INT WPUCompleteOverlappedRequest(SOCKET s, WSAOVERLAPPED *ov, DWORD error, DWORD bytes,
                                        INT *err) {
    pthread_mutex_lock(&lock);
    struct handle_rec *r = find_handle(s);
    if (r == NULL || r->closed) {
        violation("WPUCompleteOverlappedRequest(%#lx): %s", (unsigned long)s,
                  r == NULL ? "not a switch handle (SOCK-2)" : "after WPUCloseSocketHandle (CLOSE-6)");
        pthread_mutex_unlock(&lock);
        *err = WSAEINVAL;
        return SOCKET_ERROR;
    }
    if (((uintptr_t)ov->hEvent & 1u) != 0) {
        violation("WPUCompleteOverlappedRequest for an op whose hEvent has bit 0 set (XFER-7)");
    }
    /* What WPUCompleteOverlappedRequest does: bytes, then the status, release-ordered. */
    ov->InternalHigh = bytes;
    __atomic_store_n(&ov->Internal, (ULONG_PTR)error, __ATOMIC_RELEASE);
    log_upcall(UP_COMPLETE, s, ov, error, bytes);
    pthread_mutex_unlock(&lock);
    return 0;
}

/* The upcalls a SAN provider never makes. */
static void unexpected(const char *name) {
    pthread_mutex_lock(&lock);
    unexpected_upcalls++;
    fprintf(stderr, "unexpected upcall %s\n", name);
    pthread_mutex_unlock(&lock);
}
static BOOL u_close_event(WSAEVENT h, INT *e) { (void)h; (void)e; unexpected("WPUCloseEvent"); return FALSE; }
static WSAEVENT u_create_event(INT *e) { (void)e; unexpected("WPUCreateEvent"); return NULL; }
static INT u_fd_isset(SOCKET s, FD_SET *f) { (void)s; (void)f; unexpected("WPUFDIsSet"); return 0; }
static INT u_provider_path(GUID *g, WCHAR *p, INT *l, INT *e) { (void)g; (void)p; (void)l; (void)e; unexpected("WPUGetProviderPath"); return SOCKET_ERROR; }
static SOCKET u_modify_ifs(DWORD c, SOCKET s, INT *e) { (void)c; (void)s; (void)e; unexpected("WPUModifyIFSHandle"); return INVALID_SOCKET; }
static BOOL u_post_message(HWND h, UINT m, WPARAM w, LPARAM l) { (void)h; (void)m; (void)w; (void)l; unexpected("WPUPostMessage"); return FALSE; }
static INT u_blocking_cb(DWORD c, LPBLOCKINGCALLBACK *cb, DWORD_PTR *ctx, INT *e) { (void)c; (void)cb; (void)ctx; (void)e; unexpected("WPUQueryBlockingCallback"); return SOCKET_ERROR; }
static INT u_queue_apc(WSATHREADID *t, LPWSAUSERAPC f, DWORD_PTR c, INT *e) { (void)t; (void)f; (void)c; (void)e; unexpected("WPUQueueApc (XFER-8)"); return SOCKET_ERROR; }
static BOOL u_reset_event(WSAEVENT h, INT *e) { (void)h; (void)e; unexpected("WPUResetEvent"); return FALSE; }
static BOOL u_set_event(WSAEVENT h, INT *e) { (void)h; (void)e; unexpected("WPUSetEvent"); return FALSE; }
static INT u_open_thread(WSATHREADID *t, INT *e) { (void)t; (void)e; unexpected("WPUOpenCurrentThread"); return SOCKET_ERROR; }
static INT u_close_thread(WSATHREADID *t, INT *e) { (void)t; (void)e; unexpected("WPUCloseThread"); return SOCKET_ERROR; }

/* Calls through a table the provider must have copied (START-4) or ignored (spec 7-14). */
static void trap(void) {
    pthread_mutex_lock(&lock);
    trap_calls++;
    pthread_mutex_unlock(&lock);
}
static INT t_close_handle(SOCKET s, INT *e) { (void)s; trap(); *e = WSAEINVAL; return SOCKET_ERROR; }
static SOCKET t_create_handle(DWORD c, DWORD_PTR x, INT *e) { (void)c; (void)x; trap(); *e = WSAENOBUFS; return INVALID_SOCKET; }
static INT t_query(SOCKET s, DWORD_PTR *c, INT *e) { (void)s; (void)c; trap(); *e = WSAENOTSOCK; return SOCKET_ERROR; }
static INT t_complete(SOCKET s, WSAOVERLAPPED *o, DWORD a, DWORD b, INT *e) { (void)s; (void)o; (void)a; (void)b; trap(); *e = WSAEINVAL; return SOCKET_ERROR; }

static WSPUPCALLTABLEEX upcall_table(void) {
    WSPUPCALLTABLEEX t;
    t.lpWPUCloseEvent = u_close_event;
    t.lpWPUCloseSocketHandle = WPUCloseSocketHandle;
    t.lpWPUCreateEvent = u_create_event;
    t.lpWPUCreateSocketHandle = WPUCreateSocketHandle;
    t.lpWPUFDIsSet = u_fd_isset;
    t.lpWPUGetProviderPath = u_provider_path;
    t.lpWPUModifyIFSHandle = u_modify_ifs;
    t.lpWPUPostMessage = u_post_message;
    t.lpWPUQueryBlockingCallback = u_blocking_cb;
    t.lpWPUQuerySocketHandleContext = WPUQuerySocketHandleContext;
    t.lpWPUQueueApc = u_queue_apc;
    t.lpWPUResetEvent = u_reset_event;
    t.lpWPUSetEvent = u_set_event;
    t.lpWPUOpenCurrentThread = u_open_thread;
    t.lpWPUCloseThread = u_close_thread;
    t.lpWPUCompleteOverlappedRequest = WPUCompleteOverlappedRequest;
    return t;
}

static WSPUPCALLTABLEEX trap_table(void) {
    WSPUPCALLTABLEEX t = upcall_table();
    t.lpWPUCloseSocketHandle = t_close_handle;
    t.lpWPUCreateSocketHandle = t_create_handle;
    t.lpWPUQuerySocketHandleContext = t_query;
    t.lpWPUCompleteOverlappedRequest = t_complete;
    return t;
}

/* Log helpers (take the lock). */
static int log_len(void) {
    pthread_mutex_lock(&lock);
    int n = up_count;
    pthread_mutex_unlock(&lock);
    return n;
}

static int count_upcalls(int from, int kind, SOCKET h, WSAOVERLAPPED *ov) {
    int n = 0;
    pthread_mutex_lock(&lock);
    for (int i = from; i < up_count; i++) {
        if (up_log[i].kind == kind && (h == 0 || up_log[i].handle == h) &&
            (ov == NULL || up_log[i].ov == ov))
            n++;
    }
    pthread_mutex_unlock(&lock);
    return n;
}

/* The completion upcall for `ov` (from log position `from`), or NULL. */
static int find_completion(int from, WSAOVERLAPPED *ov, struct upcall *out) {
    int found = 0;
    pthread_mutex_lock(&lock);
    for (int i = from; i < up_count; i++) {
        if (up_log[i].kind == UP_COMPLETE && up_log[i].ov == ov) {
            *out = up_log[i];
            found = 1;
            break;
        }
    }
    pthread_mutex_unlock(&lock);
    return found;
}

/* CLOSE-5/6: WPUCloseSocketHandle(h) is logged exactly once and nothing for h follows it. */
static int closed_last(SOCKET h) {
    int closes = 0, after = 0;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < up_count; i++) {
        if (up_log[i].handle != h) continue;
        if (closes > 0) after++;
        if (up_log[i].kind == UP_CLOSE) closes++;
    }
    pthread_mutex_unlock(&lock);
    return closes == 1 && after == 0;
}

static SOCKET last_created(void) {
    pthread_mutex_lock(&lock);
    SOCKET h = handle_count > 0 ? handles[handle_count - 1].handle : 0;
    pthread_mutex_unlock(&lock);
    return h;
}

/* ------------------------------------------------------------------------------------------ */
/* The library                                                                                  */
/* ------------------------------------------------------------------------------------------ */

typedef uint64_t (*event_count_fn)(WSAEVENT);
typedef INT (*stats_fn)(SanpathStats *, INT *);

static LPWSPSTARTUPEX startup;
static LPWSPCLEANUP cleanup_symbol;
static event_create_fn ev_create;
static event_op_fn ev_close;
static event_wait_fn ev_wait;
static event_count_fn ev_count;
static stats_fn provider_stats;
static WSPPROC_TABLE P;

static void *extension(SOCKET s, GUID g, INT *err) {
    void *fn = NULL;
    DWORD ret = 0;
    INT rc = P.lpWSPIoctl(s, SIO_GET_EXTENSION_FUNCTION_POINTER, &g, sizeof g, &fn, sizeof fn, &ret,
                          NULL, NULL, NULL, err);
    if (rc != 0) return NULL;
    CHECK(ret == sizeof fn, "bytes returned %u", ret);
    return fn;
}

static LPFN_WSPREGISTERMEMORY RegisterMemory;
static LPFN_WSPDEREGISTERMEMORY DeregisterMemory;
static LPFN_WSPREGISTERRDMAMEMORY RegisterRdmaMemory;
static LPFN_WSPDEREGISTERRDMAMEMORY DeregisterRdmaMemory;
static LPFN_WSPRDMAWRITE RdmaWrite;
static LPFN_WSPRDMAREAD RdmaRead;

/* ------------------------------------------------------------------------------------------ */
/* Socket helpers                                                                               */
/* ------------------------------------------------------------------------------------------ */

static uint16_t be16(uint16_t v) { return (uint16_t)((v >> 8) | (v << 8)); }
static uint32_t be32(uint32_t v) {
    return (v >> 24) | ((v >> 8) & 0xFF00u) | ((v << 8) & 0xFF0000u) | (v << 24);
}

#define IP(a, b, c, d) (((uint32_t)(a) << 24) | ((uint32_t)(b) << 16) | ((uint32_t)(c) << 8) | (uint32_t)(d))
#define OUR_IP IP(198, 18, 0, 1)

static SOCKADDR_IN sin_of(uint32_t ip, uint16_t port) {
    SOCKADDR_IN a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = be16(port);
    a.sin_addr.s_addr = be32(ip);
    return a;
}

static SOCKET new_socket(void) {
    WSAPROTOCOL_INFOW pi = tcp_info();
    INT err = 0;
    int before = count_upcalls(0, UP_CREATE, 0, NULL);
    SOCKET s = P.lpWSPSocket(AF_INET, SOCK_STREAM, IPPROTO_TCP, &pi, 0, WSA_FLAG_OVERLAPPED, &err);
    REQUIRE(s != INVALID_SOCKET, "WSPSocket failed: %d", err);
    /* SOCK-1: one WPUCreateSocketHandle, and our descriptor is not the switch handle. */
    CHECK(count_upcalls(0, UP_CREATE, 0, NULL) == before + 1, "one WPUCreateSocketHandle");
    CHECK(s != last_created(), "descriptor %#lx equals the switch handle", (unsigned long)s);
    return s;
}

static int bind_to(SOCKET s, uint32_t ip, uint16_t port, INT *err) {
    SOCKADDR_IN a = sin_of(ip, port);
    return P.lpWSPBind(s, (const SOCKADDR *)&a, sizeof a, err);
}

static int connect_to(SOCKET s, uint32_t ip, uint16_t port, INT *err) {
    SOCKADDR_IN a = sin_of(ip, port);
    return P.lpWSPConnect(s, (const SOCKADDR *)&a, sizeof a, NULL, NULL, NULL, NULL, err);
}

/* Condition function: records what it saw and answers with `answer`. */
struct cond_state {
    int calls;
    INT answer;
    SOCKADDR_IN caller, callee;
    ULONG caller_len;
    DWORD_PTR data;
};
static struct cond_state cond;

static INT condition(WSABUF *caller_id, WSABUF *caller_data, QOS *sqos, QOS *gqos,
                     WSABUF *callee_id, WSABUF *callee_data, GROUP *g, DWORD_PTR data) {
    (void)caller_data; (void)sqos; (void)gqos; (void)callee_data; (void)g;
    cond.calls++;
    cond.data = data;
    if (caller_id != NULL && caller_id->len >= sizeof(SOCKADDR_IN)) {
        memcpy(&cond.caller, caller_id->buf, sizeof(SOCKADDR_IN));
        cond.caller_len = caller_id->len;
    }
    if (callee_id != NULL && callee_id->len >= sizeof(SOCKADDR_IN)) {
        memcpy(&cond.callee, callee_id->buf, sizeof(SOCKADDR_IN));
    }
    return cond.answer;
}

/* Waits for `ev`, then WSPEnumNetworkEvents; returns the record. */
static WSANETWORKEVENTS wait_events(SOCKET s, WSAEVENT ev, const char *what) {
    WSANETWORKEVENTS ne;
    memset(&ne, 0, sizeof ne);
    CHECK(ev_wait(ev, (DWORD)(WAIT_SECS * 1000)) == SANPATH_WAIT_SIGNALED, "%s: event not set", what);
    INT err = 0;
    CHECK(P.lpWSPEnumNetworkEvents(s, ev, &ne, &err) == 0, "%s: WSPEnumNetworkEvents %d", what, err);
    /* CONN-2: the record is cleared and the event reset. */
    CHECK(ev_wait(ev, 0) == SANPATH_WAIT_TIMEOUT, "%s: event still set after enum", what);
    WSANETWORKEVENTS again;
    CHECK(P.lpWSPEnumNetworkEvents(s, ev, &again, &err) == 0 && again.lNetworkEvents == 0,
          "%s: record not cleared", what);
    return ne;
}

static WSAOVERLAPPED fresh_ov(uintptr_t hevent) {
    WSAOVERLAPPED ov;
    memset(&ov, 0, sizeof ov);
    ov.hEvent = (WSAEVENT)hevent;
    return ov;
}

static ULONG_PTR internal_of(WSAOVERLAPPED *ov) {
    return __atomic_load_n(&ov->Internal, __ATOMIC_ACQUIRE);
}

/* Waits until the completion upcall for `ov` arrives; returns it (kind 0 if none). */
static struct upcall wait_completion(int from, WSAOVERLAPPED *ov, const char *what) {
    struct upcall u;
    memset(&u, 0, sizeof u);
    int ok;
    WAIT_UNTIL(ok, find_completion(from, ov, &u), WAIT_SECS);
    CHECK(ok, "%s: no WPUCompleteOverlappedRequest", what);
    return u;
}

/* Connects a fresh client to `listener` (port `port`, event `lev`) and accepts it. */
static void connect_pair(SOCKET listener, WSAEVENT lev, uint16_t port, SOCKET *client,
                         SOCKET *accepted, WSAEVENT cev) {
    INT err = 0;
    *client = new_socket();
    REQUIRE(P.lpWSPEventSelect(*client, cev, FD_CONNECT, &err) == 0, "event select %d", err);
    int rc = connect_to(*client, OUR_IP, port, &err);
    CHECK(rc == 0 || (rc == SOCKET_ERROR && err == WSAEWOULDBLOCK), "CONN-1 connect rc %d err %d", rc, err);
    WSANETWORKEVENTS ne = wait_events(listener, lev, "listener");
    CHECK((ne.lNetworkEvents & FD_ACCEPT) != 0, "CONN-9: FD_ACCEPT");
    cond.answer = CF_ACCEPT;
    *accepted = P.lpWSPAccept(listener, NULL, NULL, condition, 7, &err);
    REQUIRE(*accepted != INVALID_SOCKET, "accept %d", err);
    ne = wait_events(*client, cev, "client");
    CHECK((ne.lNetworkEvents & FD_CONNECT) != 0 && ne.iErrorCode[FD_CONNECT_BIT] == 0,
          "connect result %d", ne.iErrorCode[FD_CONNECT_BIT]);
}

/* ------------------------------------------------------------------------------------------ */
/* The scenario                                                                                 */
/* ------------------------------------------------------------------------------------------ */

int main(int argc, char **argv) {
    REQUIRE(argc == 2, "usage: switch <libsanpath_ffi.so>");
    void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    REQUIRE(lib != NULL, "dlopen: %s", dlerror());
    LOAD(startup, lib, "WSPStartupEx");
    LOAD(cleanup_symbol, lib, "WSPCleanup");
    LOAD(ev_create, lib, "sanpath_event_create");
    LOAD(ev_close, lib, "sanpath_event_close");
    LOAD(ev_wait, lib, "sanpath_event_wait");
    LOAD(ev_count, lib, "sanpath_event_set_count");
    LOAD(provider_stats, lib, "sanpath_provider_stats");

    INT err = 0;
    WSPDATA data;
    WSAPROTOCOL_INFOW pi = tcp_info();
    WSPUPCALLTABLEEX up = upcall_table();

    /* START-6: cleanup without startup. */
    CHECK(cleanup_symbol(&err) == SOCKET_ERROR && err == WSANOTINITIALISED, "START-6: %d", err);
    {
        SanpathStats st;
        CHECK(provider_stats(&st, &err) == SOCKET_ERROR && err == WSANOTINITIALISED, "stats before startup %d", err);
    }

    /* START-1: version below 2.2, NULL lpWSPData / lpProcTable. */
    CHECK(startup(0x0101, &data, &pi, &up, &P) == WSAVERNOTSUPPORTED, "START-1 version");
    CHECK(startup(0x0102, &data, &pi, &up, &P) == WSAVERNOTSUPPORTED, "START-1 version 2.1");
    CHECK(startup(0x0202, NULL, &pi, &up, &P) == WSAEFAULT, "START-1 NULL lpWSPData");
    CHECK(startup(0x0202, &data, &pi, &up, NULL) == WSAEFAULT, "START-1 NULL lpProcTable");
    CHECK(startup(0x0202, &data, &pi, NULL, &P) == WSAEFAULT, "NULL upcall table");

    /* START-3: the TCP/IP protocol entry is accepted. */
    memset(&P, 0, sizeof P);
    memset(&data, 0, sizeof data);
    REQUIRE(startup(0x0202, &data, &pi, &up, &P) == 0, "WSPStartupEx");
    CHECK(data.wVersion == 0x0202 && data.wHighVersion == 0x0202, "WSPDATA version %#x", data.wVersion);
    CHECK(data.szDescription[0] != 0 && data.szDescription[255] == 0, "WSPDATA description");

    /* START-2: all 30 slots non-NULL. */
    {
        uintptr_t slots[sizeof(WSPPROC_TABLE) / sizeof(uintptr_t)];
        memcpy(slots, &P, sizeof slots);
        CHECK(sizeof slots / sizeof slots[0] == 30, "30 slots");
        for (size_t i = 0; i < sizeof slots / sizeof slots[0]; i++) CHECK(slots[i] != 0, "slot %zu is NULL", i);
    }

    /* START-4: overwrite the caller's table; the provider must not notice. */
    up = trap_table();

    /* START-5 / spec 7-14: a second startup (with a table the provider must ignore), then
       one cleanup: the provider stays usable. */
    {
        WSPDATA d2;
        WSPPROC_TABLE p2;
        WSPUPCALLTABLEEX up2 = trap_table();
        REQUIRE(startup(0x0202, &d2, &pi, &up2, &p2) == 0, "second WSPStartupEx");
        CHECK(memcmp(&p2, &P, sizeof P) == 0, "same procedure table");
        CHECK(p2.lpWSPCleanup(&err) == 0, "paired cleanup %d", err);
    }

    /* The N functions fail WSAEOPNOTSUPP, never crash. */
    CHECK(P.lpWSPCancelBlockingCall(&err) == SOCKET_ERROR && err == WSAEOPNOTSUPP, "CancelBlockingCall");
    CHECK(P.lpWSPShutdown(1, 2, &err) == SOCKET_ERROR && err == WSAEOPNOTSUPP, "Shutdown");

    /* ---- Sockets and the extension functions ---- */
    SOCKET L = new_socket();

    /* EXT-1: the five mandatory extensions (and RDMA read). EXT-3: caching is off by default. */
    {
        void *f;
        f = extension(L, WSAID_REGISTERMEMORY, &err); CHECK(f != NULL, "EXT-1 RegisterMemory %d", err);
        memcpy(&RegisterMemory, &f, sizeof f);
        f = extension(L, WSAID_DEREGISTERMEMORY, &err); CHECK(f != NULL, "EXT-1 DeregisterMemory %d", err);
        memcpy(&DeregisterMemory, &f, sizeof f);
        f = extension(L, WSAID_REGISTERRDMAMEMORY, &err); CHECK(f != NULL, "EXT-1 RegisterRdmaMemory %d", err);
        memcpy(&RegisterRdmaMemory, &f, sizeof f);
        f = extension(L, WSAID_DEREGISTERRDMAMEMORY, &err); CHECK(f != NULL, "EXT-1 DeregisterRdmaMemory %d", err);
        memcpy(&DeregisterRdmaMemory, &f, sizeof f);
        f = extension(L, WSAID_RDMAWRITE, &err); CHECK(f != NULL, "EXT-1 RdmaWrite %d", err);
        memcpy(&RdmaWrite, &f, sizeof f);
        f = extension(L, WSAID_RDMAREAD, &err); CHECK(f != NULL, "EXT-2 RdmaRead %d", err);
        memcpy(&RdmaRead, &f, sizeof f);
        f = extension(L, WSAID_MEMORYREGISTRATIONCACHECALLBACK, &err);
        CHECK(f == NULL && err == WSAEOPNOTSUPP, "EXT-3 cache callback: %p %d", f, err);
        /* The socket argument is not validated (spec 7-12). */
        f = extension((SOCKET)0xBAD, WSAID_RDMAWRITE, &err); CHECK(f != NULL, "EXT-1 with a helper socket");
        GUID unknown = WSAID_RDMAWRITE;
        unknown.Data1 ^= 0x1000;
        f = extension(L, unknown, &err); CHECK(f == NULL && err == WSAEINVAL, "unknown GUID %d", err);
        /* Wrong GUID size and short output: WSAEFAULT. */
        GUID g = WSAID_RDMAWRITE;
        void *out = NULL;
        DWORD ret = 0;
        CHECK(P.lpWSPIoctl(L, SIO_GET_EXTENSION_FUNCTION_POINTER, &g, 15, &out, sizeof out, &ret, NULL, NULL, NULL, &err) == SOCKET_ERROR && err == WSAEFAULT, "cbIn 15");
        CHECK(P.lpWSPIoctl(L, SIO_GET_EXTENSION_FUNCTION_POINTER, &g, sizeof g, &out, 4, &ret, NULL, NULL, NULL, &err) == SOCKET_ERROR && err == WSAEFAULT, "cbOut 4");
        CHECK(P.lpWSPIoctl(L, 0x12345678, &g, sizeof g, &out, sizeof out, &ret, NULL, NULL, NULL, &err) == SOCKET_ERROR && err == WSAEINVAL, "unknown ioctl");
    }
    REQUIRE(RegisterMemory && DeregisterMemory && RegisterRdmaMemory && DeregisterRdmaMemory && RdmaWrite && RdmaRead,
            "extension functions");

    /* EXT-4: SIO_ADDRESS_LIST_QUERY. */
    {
        uint64_t buf[16];
        DWORD ret = 0;
        CHECK(P.lpWSPIoctl(L, SIO_ADDRESS_LIST_QUERY, NULL, 0, buf, 4, &ret, NULL, NULL, NULL, &err) == SOCKET_ERROR &&
                  err == WSAEFAULT && ret == 8 + 32,
              "EXT-4 too small: err %d needed %u", err, ret);
        memset(buf, 0xAB, sizeof buf);
        CHECK(P.lpWSPIoctl(L, SIO_ADDRESS_LIST_QUERY, NULL, 0, buf, sizeof buf, &ret, NULL, NULL, NULL, &err) == 0,
              "EXT-4 %d", err);
        SOCKET_ADDRESS_LIST *list = (SOCKET_ADDRESS_LIST *)buf;
        CHECK(ret == 8 + 32 && list->iAddressCount == 1, "EXT-4 count %d ret %u", list->iAddressCount, ret);
        SOCKADDR_IN *a = (SOCKADDR_IN *)list->Address[0].lpSockaddr;
        CHECK((char *)a >= (char *)buf && (char *)a + sizeof *a <= (char *)buf + ret, "EXT-4 sockaddr inside the buffer");
        CHECK(list->Address[0].iSockaddrLength == (INT)sizeof(SOCKADDR_IN), "EXT-4 length");
        CHECK(a->sin_family == AF_INET && a->sin_addr.s_addr == be32(OUR_IP), "EXT-4 address %#x", a->sin_addr.s_addr);
    }

    /* START-8: no QoS. */
    CHECK(P.lpWSPGetQOSByName(L, NULL, NULL, &err) == FALSE && err == WSAEOPNOTSUPP, "START-8 %d", err);

    /* CONN-7: listen on an unbound socket. SOCK-3: bind to an address that is not ours, twice. */
    CHECK(P.lpWSPListen(L, SOMAXCONN, &err) == SOCKET_ERROR && err == WSAEINVAL, "CONN-7 %d", err);
    CHECK(bind_to(L, IP(10, 9, 8, 7), 5000, &err) == SOCKET_ERROR && err == WSAEADDRNOTAVAIL, "SOCK-3 %d", err);
    {
        SOCKADDR_IN a = sin_of(OUR_IP, 5000);
        CHECK(P.lpWSPBind(L, (const SOCKADDR *)&a, 15, &err) == SOCKET_ERROR && err == WSAEFAULT, "short namelen");
        a.sin_family = 23;
        CHECK(P.lpWSPBind(L, (const SOCKADDR *)&a, sizeof a, &err) == SOCKET_ERROR && err == WSAEFAULT, "family");
    }
    REQUIRE(bind_to(L, OUR_IP, 5000, &err) == 0, "bind %d", err);
    CHECK(bind_to(L, OUR_IP, 5000, &err) == SOCKET_ERROR && err == WSAEINVAL, "SOCK-3 second bind %d", err);
    REQUIRE(P.lpWSPListen(L, SOMAXCONN, &err) == 0, "CONN-7 SOMAXCONN %d", err);
    WSAEVENT evL = ev_create();
    REQUIRE(evL != NULL, "event");
    REQUIRE(P.lpWSPEventSelect(L, evL, FD_ACCEPT, &err) == 0, "event select %d", err);
    CHECK(P.lpWSPEventSelect(L, (WSAEVENT)(uintptr_t)0x7777, FD_ACCEPT, &err) == SOCKET_ERROR && err == WSAEINVAL,
          "a handle not from sanpath_event_create");

    /* CONN-13: nothing queued. */
    CHECK(P.lpWSPAccept(L, NULL, NULL, condition, 0, &err) == INVALID_SOCKET && err == WSAEWOULDBLOCK, "CONN-13 %d", err);

    /* CONN-12: a rejected request. */
    {
        WSAEVENT evR = ev_create();
        SOCKET R = new_socket();
        REQUIRE(P.lpWSPEventSelect(R, evR, FD_CONNECT, &err) == 0, "event select %d", err);
        int rc = connect_to(R, OUR_IP, 5000, &err);
        CHECK(rc == 0 || (rc == SOCKET_ERROR && err == WSAEWOULDBLOCK), "CONN-1 rc %d err %d", rc, err);
        WSANETWORKEVENTS ne = wait_events(L, evL, "listener");
        CHECK((ne.lNetworkEvents & FD_ACCEPT) != 0, "CONN-9 FD_ACCEPT");
        int creates = count_upcalls(0, UP_CREATE, 0, NULL);
        cond.calls = 0;
        cond.answer = CF_REJECT;
        SOCKET x = P.lpWSPAccept(L, NULL, NULL, condition, 0, &err);
        CHECK(x == INVALID_SOCKET && err == WSAECONNREFUSED, "CONN-12 %d", err);
        CHECK(cond.calls == 1, "condition called %d times", cond.calls);
        CHECK(count_upcalls(0, UP_CREATE, 0, NULL) == creates, "no socket handle for a rejected request");
        ne = wait_events(R, evR, "rejected client");
        CHECK((ne.lNetworkEvents & FD_CONNECT) && ne.iErrorCode[FD_CONNECT_BIT] == WSAECONNREFUSED,
              "CONN-12 remote result %d", ne.iErrorCode[FD_CONNECT_BIT]);
        CHECK(P.lpWSPCloseSocket(R, &err) == 0, "close %d", err);
        ev_close(evR);
    }

    /* CONN-10/11: an accepted request, with address and condition data. */
    WSAEVENT evC = ev_create();
    SOCKET C = new_socket();
    SOCKET hC = last_created();
    REQUIRE(P.lpWSPEventSelect(C, evC, FD_CONNECT, &err) == 0, "event select %d", err);
    {
        int rc = connect_to(C, OUR_IP, 5000, &err);
        CHECK(rc == 0 || (rc == SOCKET_ERROR && err == WSAEWOULDBLOCK), "CONN-1 rc %d err %d", rc, err);
    }
    WSANETWORKEVENTS ne = wait_events(L, evL, "listener");
    CHECK((ne.lNetworkEvents & FD_ACCEPT) != 0, "CONN-9 FD_ACCEPT");
    cond.calls = 0;
    cond.answer = CF_ACCEPT;
    SOCKADDR_IN peer;
    INT peer_len = 3;
    CHECK(P.lpWSPAccept(L, (SOCKADDR *)&peer, &peer_len, condition, 0xC0FFEE, &err) == INVALID_SOCKET && err == WSAEFAULT,
          "short addrlen");
    CHECK(cond.calls == 0, "no condition call before the arguments are checked");
    peer_len = sizeof peer;
    int creates = count_upcalls(0, UP_CREATE, 0, NULL);
    SOCKET A = P.lpWSPAccept(L, (SOCKADDR *)&peer, &peer_len, condition, 0xC0FFEE, &err);
    REQUIRE(A != INVALID_SOCKET, "accept %d", err);
    SOCKET hA = last_created();
    CHECK(count_upcalls(0, UP_CREATE, 0, NULL) == creates + 1, "CONN-11 one WPUCreateSocketHandle");
    CHECK(A != hA, "SOCK-1 accepted descriptor differs from its switch handle");
    CHECK(cond.calls == 1 && cond.data == 0xC0FFEE, "CONN-10 condition calls %d data %#lx", cond.calls, (unsigned long)cond.data);
    CHECK(cond.caller_len == sizeof(SOCKADDR_IN) && cond.caller.sin_family == AF_INET && cond.caller.sin_addr.s_addr == be32(OUR_IP),
          "CONN-10 caller id");
    CHECK(cond.callee.sin_port == be16(5000) && cond.callee.sin_addr.s_addr == be32(OUR_IP), "CONN-10 callee id");
    CHECK(peer_len == sizeof(SOCKADDR_IN) && peer.sin_family == AF_INET && peer.sin_addr.s_addr == be32(OUR_IP) &&
              peer.sin_port == cond.caller.sin_port,
          "accept address");
    ne = wait_events(C, evC, "client");
    CHECK((ne.lNetworkEvents & FD_CONNECT) && ne.iErrorCode[FD_CONNECT_BIT] == 0, "CONN-2 result %d",
          ne.iErrorCode[FD_CONNECT_BIT]);
    CHECK(ev_count(evC) == 1, "CONN-2 event set %lu times", (unsigned long)ev_count(evC));
    CHECK(P.lpWSPAccept(L, NULL, NULL, condition, 0, &err) == INVALID_SOCKET && err == WSAEWOULDBLOCK, "CONN-13 %d", err);

    /* SOCK-4/5: options. */
    {
        char v[8];
        INT len = sizeof v;
        CHECK(P.lpWSPGetSockOpt(A, SOL_SOCKET, SO_RDMA_THRESHOLD_SIZE, v, &len, &err) == 0 && len == 4, "SOCK-4 threshold");
        len = sizeof v;
        CHECK(P.lpWSPGetSockOpt(A, SOL_SOCKET, SO_MAX_RDMA_SIZE, v, &len, &err) == 0 && len == 4, "SOCK-4 max rdma");
        len = 2;
        CHECK(P.lpWSPGetSockOpt(A, SOL_SOCKET, SO_MAX_RDMA_SIZE, v, &len, &err) == SOCKET_ERROR && err == WSAEFAULT, "SOCK-5 short");
        len = sizeof v;
        CHECK(P.lpWSPGetSockOpt(A, SOL_SOCKET, 0x1234, v, &len, &err) == SOCKET_ERROR && err == WSAENOPROTOOPT, "SOCK-5 unknown");
        INT one = 1;
        CHECK(P.lpWSPSetSockOpt(A, IPPROTO_TCP, TCP_NODELAY, (const char *)&one, sizeof one, &err) == 0, "TCP_NODELAY %d", err);
        CHECK(P.lpWSPSetSockOpt(A, SOL_SOCKET, 0x1234, (const char *)&one, sizeof one, &err) == SOCKET_ERROR && err == WSAENOPROTOOPT, "SOCK-5 set");
    }

    /* ---- Memory registration (MEM-1) ---- */
    enum { REGION = 64 * 1024 };
    char *cbuf = NULL, *abuf = NULL;
    REQUIRE(posix_memalign((void **)&cbuf, 4096, REGION) == 0 && posix_memalign((void **)&abuf, 4096, REGION) == 0, "memory");
    memset(cbuf, 0, REGION);
    memset(abuf, 0, REGION);
    CHECK(RegisterMemory(L, cbuf, REGION, MEM_READWRITE, &err) == NULL && err == WSAENOTCONN, "MEM-1 unconnected: %d", err);
    CHECK(RegisterMemory(C, cbuf, REGION, 7, &err) == NULL && err == WSAEINVAL, "MEM-1 flags: %d", err);
    HANDLE mC = RegisterMemory(C, cbuf, REGION, MEM_READWRITE, &err);
    REQUIRE(mC != NULL, "register on C: %d", err);
    HANDLE mA = RegisterMemory(A, abuf, REGION, MEM_READWRITE, &err);
    REQUIRE(mA != NULL, "register on A: %d", err);

    /* ---- Send / receive (XFER-1..7) ---- */
    int mark = log_len();
    WSAOVERLAPPED ovR = fresh_ov(0); /* bit 0 clear: notify */
    WSAOVERLAPPED ovS = fresh_ov(1); /* bit 0 set: poll */
    {
        WSABUF rb = {4096, abuf};
        DWORD flags = 0, n = 0;
        CHECK(P.lpWSPRecv(A, &rb, 1, &n, &flags, &ovR, NULL, NULL, &err) == SOCKET_ERROR && err == WSA_IO_PENDING,
              "XFER-1 recv %d", err);
        CHECK(internal_of(&ovR) == WSS_OPERATION_IN_PROGRESS, "XFER-3 Internal %#lx", (unsigned long)ovR.Internal);
        DWORD bytes = 0, fl = 0;
        CHECK(P.lpWSPGetOverlappedResult(A, &ovR, &bytes, FALSE, &fl, &err) == FALSE && err == WSA_IO_INCOMPLETE,
              "XFER-3 %d", err);
        for (int i = 0; i < 100; i++) cbuf[i] = (char)(i * 7 + 1);
        WSABUF sb = {100, cbuf};
        CHECK(P.lpWSPSend(C, &sb, 1, &n, 0, &ovS, NULL, NULL, &err) == SOCKET_ERROR && err == WSA_IO_PENDING,
              "XFER-1 send %d", err);
        struct upcall u = wait_completion(mark, &ovR, "recv");
        CHECK(u.handle == hA && u.error == 0 && u.bytes == 100, "XFER-6 handle %#lx err %u bytes %u",
              (unsigned long)u.handle, u.error, u.bytes);
        CHECK(count_upcalls(mark, UP_COMPLETE, 0, &ovR) == 1, "XFER-6 exactly one upcall");
        CHECK(P.lpWSPGetOverlappedResult(A, &ovR, &bytes, FALSE, &fl, &err) == TRUE && bytes == 100 && fl == 0,
              "XFER-4 bytes %u", bytes);
        CHECK(memcmp(abuf, cbuf, 100) == 0, "XFER-2 data");
        int ok;
        WAIT_UNTIL(ok, P.lpWSPGetOverlappedResult(C, &ovS, &bytes, FALSE, &fl, &err) == TRUE, WAIT_SECS);
        CHECK(ok && bytes == 100, "XFER-7 polled send: bytes %u err %d", bytes, err);
        CHECK(count_upcalls(mark, UP_COMPLETE, 0, &ovS) == 0, "XFER-7 no upcall for hEvent bit 0");
        /* Hostile overlapped arguments. */
        CHECK(P.lpWSPSend(C, &sb, 1, &n, 0, NULL, NULL, NULL, &err) == SOCKET_ERROR && err == WSAEFAULT, "NULL overlapped");
        CHECK(P.lpWSPSend(C, &sb, 1, &n, 0, (WSAOVERLAPPED *)((char *)&ovS + 4), NULL, NULL, &err) == SOCKET_ERROR &&
                  err == WSAEFAULT,
              "misaligned overlapped");
        CHECK(P.lpWSPSend(C, &sb, 1000, &n, 0, &ovS, NULL, NULL, &err) == SOCKET_ERROR && err == WSAEINVAL, "1000 buffers");
    }

    /* ---- RDMA (MEM-4, RDMA-1..4) ---- */
    {
        char *target = abuf + 32768;
        unsigned char desc[64];
        DWORD dlen = 4;
        CHECK(RegisterRdmaMemory(A, target, 8192, MEM_READWRITE, desc, &dlen, &err) == SOCKET_ERROR && err == WSAEFAULT &&
                  dlen == SANPATH_RDMA_DESCRIPTOR_LEN,
              "MEM-4 err %d len %u", err, dlen);
        REQUIRE(RegisterRdmaMemory(A, target, 8192, MEM_READWRITE, desc, &dlen, &err) == 0, "MEM-4 retry %d", err);
        CHECK(dlen == SANPATH_RDMA_DESCRIPTOR_LEN, "descriptor length %u", dlen);

        mark = log_len();
        char *src = cbuf + 4096;
        for (int i = 0; i < 1000; i++) src[i] = (char)(i * 13 + 5);
        WSABUFEX wb = {1000, src, mC};
        WSAOVERLAPPED ovW = fresh_ov(0);
        DWORD n = 0;
        CHECK(RdmaWrite(C, &wb, 1, desc, dlen, 128, &n, 0, &ovW, NULL, NULL, &err) == SOCKET_ERROR && err == WSA_IO_PENDING,
              "RDMA-3 write %d", err);
        struct upcall u = wait_completion(mark, &ovW, "rdma write");
        CHECK(u.handle == hC && u.error == 0 && u.bytes == 1000, "RDMA-1/4 err %u bytes %u", u.error, u.bytes);
        CHECK(memcmp(target + 128, src, 1000) == 0, "RDMA-1 data at the offset");
        int untouched = 1;
        for (int i = 0; i < 128; i++) untouched &= target[i] == 0;
        CHECK(untouched && target[1128] == 0, "RDMA-1 only those bytes");
        DWORD bytes = 0, fl = 0;
        CHECK(P.lpWSPGetOverlappedResult(C, &ovW, &bytes, FALSE, &fl, &err) == TRUE && bytes == 1000, "RDMA-4 result");

        for (int i = 0; i < 500; i++) target[2048 + i] = (char)(i * 3 + 11);
        char *sink = cbuf + 16384;
        WSABUFEX rb = {500, sink, mC};
        WSAOVERLAPPED ovRd = fresh_ov(1); /* polled */
        CHECK(RdmaRead(C, &rb, 1, desc, dlen, 2048, &n, 0, &ovRd, NULL, NULL, &err) == SOCKET_ERROR && err == WSA_IO_PENDING,
              "RDMA-3 read %d", err);
        int ok;
        WAIT_UNTIL(ok, P.lpWSPGetOverlappedResult(C, &ovRd, &bytes, FALSE, &fl, &err) == TRUE, WAIT_SECS);
        CHECK(ok && bytes == 500, "RDMA-2 bytes %u err %d", bytes, err);
        CHECK(memcmp(sink, target + 2048, 500) == 0, "RDMA-2 data");
        CHECK(count_upcalls(mark, UP_COMPLETE, 0, &ovRd) == 0, "XFER-7 for RDMA read");

        /* A descriptor block that is too long or garbage. */
        CHECK(RdmaWrite(C, &wb, 1, desc, 100000, 0, &n, 0, &ovW, NULL, NULL, &err) == SOCKET_ERROR && err == WSAEINVAL,
              "huge descriptor length %d", err);
        CHECK(DeregisterRdmaMemory(A, desc, dlen, &err) == 0, "deregister rdma %d", err);
        CHECK(DeregisterRdmaMemory(A, desc, dlen, &err) == SOCKET_ERROR && err == WSAEINVAL, "deregister twice %d", err);
    }

    /* ---- Close with pending ops (CLOSE-1,3..7; XFER-5,9; CLOSE-8,9) ---- */
    {
        WSAOVERLAPPED ovC1 = fresh_ov(0), ovA1 = fresh_ov(0), ovA2 = fresh_ov(3);
        WSABUF cb = {256, cbuf + 32768};
        WSABUF ab1 = {256, abuf};
        WSABUF ab2 = {256, abuf + 4096};
        DWORD flags = 0, n = 0;
        CHECK(P.lpWSPRecv(C, &cb, 1, &n, &flags, &ovC1, NULL, NULL, &err) == SOCKET_ERROR && err == WSA_IO_PENDING, "recv C");
        CHECK(P.lpWSPRecv(A, &ab1, 1, &n, &flags, &ovA1, NULL, NULL, &err) == SOCKET_ERROR && err == WSA_IO_PENDING, "recv A1");
        CHECK(P.lpWSPRecv(A, &ab2, 1, &n, &flags, &ovA2, NULL, NULL, &err) == SOCKET_ERROR && err == WSA_IO_PENDING, "recv A2");
        mark = log_len();
        CHECK(P.lpWSPCloseSocket(A, &err) == 0, "CLOSE-1 %d", err);
        int ok;
        WAIT_UNTIL(ok, count_upcalls(mark, UP_CLOSE, hA, NULL) == 1, WAIT_SECS);
        CHECK(ok, "CLOSE-5 WPUCloseSocketHandle for A");
        struct upcall u;
        CHECK(find_completion(mark, &ovA1, &u) && u.error == WSA_OPERATION_ABORTED && u.handle == hA, "CLOSE-3 notified abort");
        CHECK(count_upcalls(mark, UP_COMPLETE, 0, &ovA1) == 1, "CLOSE-3 exactly once");
        CHECK(count_upcalls(mark, UP_COMPLETE, 0, &ovA2) == 0, "CLOSE-3 no upcall for hEvent bit 0");
        CHECK(internal_of(&ovA2) == WSA_OPERATION_ABORTED, "CLOSE-3 polled abort: Internal %lu", (unsigned long)internal_of(&ovA2));
        CHECK(closed_last(hA), "CLOSE-5/6 close-handle last and once");
        /* CLOSE-7 */
        DWORD bytes = 0, fl = 0;
        WSAOVERLAPPED ovX = fresh_ov(0);
        CHECK(P.lpWSPRecv(A, &ab1, 1, &n, &flags, &ovX, NULL, NULL, &err) == SOCKET_ERROR && err == WSAENOTSOCK, "CLOSE-7 recv %d", err);
        CHECK(P.lpWSPGetOverlappedResult(A, &ovA1, &bytes, FALSE, &fl, &err) == FALSE && err == WSAENOTSOCK, "CLOSE-7 result %d", err);
        CHECK(P.lpWSPCloseSocket(A, &err) == SOCKET_ERROR && err == WSAENOTSOCK, "CLOSE-7 close %d", err);
        CHECK(RegisterMemory(A, abuf, 4096, MEM_READ, &err) == NULL && err == WSAENOTSOCK, "CLOSE-7 register %d", err);

        /* XFER-9 / CLOSE-9: the peer's pending receive completes with WSAECONNRESET. */
        u = wait_completion(mark, &ovC1, "peer receive");
        CHECK(u.error == WSAECONNRESET && u.handle == hC, "XFER-9 err %u", u.error);
        CHECK(P.lpWSPGetOverlappedResult(C, &ovC1, &bytes, FALSE, &fl, &err) == FALSE && err == WSAECONNRESET,
              "XFER-5 err %d", err);
        /* CLOSE-8: the socket object survives the peer's teardown. */
        char v[4];
        INT len = sizeof v;
        CHECK(P.lpWSPGetSockOpt(C, SOL_SOCKET, SO_MAX_MSG_SIZE, v, &len, &err) == 0, "CLOSE-8 %d", err);
        CHECK(DeregisterMemory(C, mC, &err) == 0, "deregister %d", err);
        CHECK(DeregisterMemory(C, mC, &err) == SOCKET_ERROR && err == WSAEINVAL, "MEM-3 unknown handle %d", err);
        mark = log_len();
        CHECK(P.lpWSPCloseSocket(C, &err) == 0, "CLOSE-1 peer-reset socket %d", err);
        WAIT_UNTIL(ok, count_upcalls(mark, UP_CLOSE, hC, NULL) == 1, WAIT_SECS);
        CHECK(ok && closed_last(hC), "CLOSE-5 for C");
    }

    /* ---- DUP-1..3 (one process: the source is also the target, which spec 4.8 step 3 allows;
     * the peer is the accepted socket, served by this provider's own rejoin service) ---- */
    {
        WSAEVENT ev4 = ev_create();
        SOCKET C4, A4;
        connect_pair(L, evL, 5000, &C4, &A4, ev4);
        HANDLE m4 = RegisterMemory(C4, cbuf, REGION, MEM_READWRITE, &err);
        CHECK(m4 != NULL, "register %d", err);
        HANDLE mp = RegisterMemory(A4, abuf, REGION, MEM_READWRITE, &err);
        CHECK(mp != NULL, "register %d", err);
        DWORD flags = 0, n = 0;
        WSAOVERLAPPED ovD = fresh_ov(0), ovP = fresh_ov(0);
        WSABUF bd = {64, cbuf}, bp = {64, abuf};
        memset(abuf, 0, 64);
        CHECK(P.lpWSPRecv(C4, &bd, 1, &n, &flags, &ovD, NULL, NULL, &err) == SOCKET_ERROR && err == WSA_IO_PENDING, "recv C4");
        CHECK(P.lpWSPRecv(A4, &bp, 1, &n, &flags, &ovP, NULL, NULL, &err) == SOCKET_ERROR && err == WSA_IO_PENDING, "recv A4");
        WSAPROTOCOL_INFOW pi = tcp_info();
        CHECK(P.lpWSPDuplicateSocket(C4, (DWORD)getpid(), NULL, &err) == SOCKET_ERROR && err == WSAEFAULT, "NULL info %d", err);
        mark = log_len();
        REQUIRE(P.lpWSPDuplicateSocket(C4, (DWORD)getpid(), &pi, &err) == 0, "WSPDuplicateSocket %d", err);
        CHECK(pi.dwProviderReserved != 0, "DUP-1 dwProviderReserved is 0");
        struct upcall u;
        CHECK(find_completion(mark, &ovD, &u) && u.error == 0 && u.bytes == 0, "DUP-1 pending receive: %d/%u", u.error, u.bytes);
        CHECK(count_upcalls(mark, UP_COMPLETE, 0, &ovD) == 1, "DUP-1 one completion");
        int creates = count_upcalls(0, UP_CREATE, 0, NULL);
        SOCKET D = P.lpWSPSocket(AF_INET, SOCK_STREAM, IPPROTO_TCP, &pi, 0, WSA_FLAG_OVERLAPPED, &err);
        REQUIRE(D != INVALID_SOCKET, "DUP-2 WSPSocket with dwProviderReserved %d", err);
        CHECK(count_upcalls(0, UP_CREATE, 0, NULL) == creates + 1 && D != C4, "DUP-2 a new socket");
        CHECK(P.lpWSPSocket(AF_INET, SOCK_STREAM, IPPROTO_TCP, &pi, 0, WSA_FLAG_OVERLAPPED, &err) == INVALID_SOCKET &&
                  err == WSAEINVAL,
              "DUP-2 claimed twice %d", err);
        /* DUP-3: the old descriptor is still ours (not WSAENOTSOCK) until closed. */
        CHECK(P.lpWSPSend(C4, &bd, 1, &n, 0, &ovD, NULL, NULL, &err) == SOCKET_ERROR && err != WSAENOTSOCK &&
                  err != WSA_IO_PENDING,
              "DUP-3 old descriptor %d", err);
        CHECK(P.lpWSPCloseSocket(C4, &err) == 0, "DUP-3 close the old descriptor %d", err);
        /* DUP-2: the peer's receive, posted before, gets the new socket's message. */
        HANDLE md = RegisterMemory(D, cbuf, REGION, MEM_READWRITE, &err);
        CHECK(md != NULL, "register on the duplicate %d", err);
        memcpy(cbuf, "dup!", 4);
        WSAOVERLAPPED ovS = fresh_ov(0);
        WSABUF bs = {4, cbuf};
        CHECK(P.lpWSPSend(D, &bs, 1, &n, 0, &ovS, NULL, NULL, &err) == SOCKET_ERROR && err == WSA_IO_PENDING, "send D %d", err);
        u = wait_completion(mark, &ovS, "DUP-2 send");
        CHECK(u.error == 0 && u.bytes == 4, "DUP-2 send %d/%u", u.error, u.bytes);
        u = wait_completion(mark, &ovP, "DUP-2 peer receive");
        CHECK(u.error == 0 && u.bytes == 4 && memcmp(abuf, "dup!", 4) == 0, "DUP-2 peer receive %d/%u", u.error, u.bytes);
        CHECK(P.lpWSPCloseSocket(D, &err) == 0, "close %d", err);
        CHECK(P.lpWSPCloseSocket(A4, &err) == 0, "close %d", err);
        ev_close(ev4);
    }

    /* ---- START-7: the final cleanup aborts pending ops and closes every socket ---- */
    {
        WSAEVENT ev3 = ev_create();
        SOCKET C3, A3;
        connect_pair(L, evL, 5000, &C3, &A3, ev3);
        SOCKET hA3 = last_created();
        HANDLE m3 = RegisterMemory(A3, abuf, REGION, MEM_READWRITE, &err);
        CHECK(m3 != NULL, "register %d", err);
        WSAOVERLAPPED ov3 = fresh_ov(0);
        WSABUF b3 = {512, abuf};
        DWORD flags = 0, n = 0;
        CHECK(P.lpWSPRecv(A3, &b3, 1, &n, &flags, &ov3, NULL, NULL, &err) == SOCKET_ERROR && err == WSA_IO_PENDING, "recv A3");
        /* The counters see the pair, the listener, the pending receive and the ops the close
           above aborted and reset. */
        SanpathStats st;
        memset(&st, 0xA5, sizeof st);
        CHECK(provider_stats(&st, &err) == 0, "sanpath_provider_stats %d", err);
        CHECK(st.sockets_connected == 2 && st.sockets_listening == 1, "stats: %llu connected, %llu listening",
              (unsigned long long)st.sockets_connected, (unsigned long long)st.sockets_listening);
        CHECK(st.sockets == st.sockets_open + st.sockets_bound + st.sockets_listening + st.sockets_connecting +
                               st.sockets_connected, "stats: sockets by state add up");
        CHECK(st.ops_in_flight == 1, "stats: %llu ops in flight", (unsigned long long)st.ops_in_flight);
        CHECK(st.completed_aborted >= 2 && st.completed_reset >= 1, "stats: %llu aborted, %llu reset",
              (unsigned long long)st.completed_aborted, (unsigned long long)st.completed_reset);
        CHECK(st.registrations >= 1 && st.registered_bytes >= REGION, "stats: %llu registrations, %llu bytes",
              (unsigned long long)st.registrations, (unsigned long long)st.registered_bytes);
        CHECK(provider_stats(NULL, &err) == SOCKET_ERROR && err == WSAEFAULT, "stats NULL %d", err);
        mark = log_len();
        CHECK(P.lpWSPCleanup(&err) == 0, "final WSPCleanup %d", err);
        struct upcall u;
        CHECK(find_completion(mark, &ov3, &u) && u.error == WSA_OPERATION_ABORTED && u.handle == hA3, "START-7");
        CHECK(closed_last(hA3), "cleanup closed A3");
        CHECK(provider_stats(&st, &err) == 0 && st.sockets == 0 && st.sockets_closing == 0 && st.ops_in_flight == 0 &&
                  st.registrations == 0,
              "stats after the last cleanup: %llu sockets, %llu closing, %llu ops, %llu registrations",
              (unsigned long long)st.sockets, (unsigned long long)st.sockets_closing,
              (unsigned long long)st.ops_in_flight, (unsigned long long)st.registrations);
        CHECK(P.lpWSPCleanup(&err) == SOCKET_ERROR && err == WSANOTINITIALISED, "START-6 after the last cleanup %d", err);
        CHECK(P.lpWSPSocket(AF_INET, SOCK_STREAM, IPPROTO_TCP, NULL, 0, WSA_FLAG_OVERLAPPED, &err) == INVALID_SOCKET,
              "no sockets after cleanup");
        ev_close(ev3);
    }

    /* Every handle was closed exactly once, after its last other upcall. */
    pthread_mutex_lock(&lock);
    int open_handles = 0;
    for (int i = 0; i < handle_count; i++) open_handles += !handles[i].closed;
    int handles_total = handle_count;
    pthread_mutex_unlock(&lock);
    CHECK(open_handles == 0, "%d of %d switch handles never closed", open_handles, handles_total);
    for (int i = 0; i < handles_total; i++) CHECK(closed_last(handles[i].handle), "handle %d", i);
    CHECK(violations == 0, "%d upcall rule violations", violations);
    CHECK(unexpected_upcalls == 0, "%d unexpected upcalls", unexpected_upcalls);
    CHECK(trap_calls == 0, "START-4: %d calls through a table changed after startup", trap_calls);

    ev_close(evL);
    ev_close(evC);
    free(cbuf);
    free(abuf);
    printf("c switch: %d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
