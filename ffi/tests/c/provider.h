/*
 * What the C test programs share to load the provider through its C ABI: the sanpath extension
 * functions' types, dlsym with a REQUIRE, and the protocol entry they open sockets with.
 * Include after "sanpath.h" and "check.h".
 */
#ifndef SANPATH_TEST_PROVIDER_H
#define SANPATH_TEST_PROVIDER_H

#include <dlfcn.h>
#include <string.h>

#define CATALOG_ID 1234u

typedef WSAEVENT (*event_create_fn)(void);
typedef BOOL (*event_op_fn)(WSAEVENT);
typedef INT (*event_wait_fn)(WSAEVENT, DWORD);

static inline void *symbol(void *lib, const char *name) {
    void *p = dlsym(lib, name);
    REQUIRE(p != NULL, "dlsym(%s): %s", name, dlerror());
    return p;
}

#define LOAD(var, lib, name) memcpy(&(var), &(void *){symbol((lib), (name))}, sizeof(var))

static inline WSAPROTOCOL_INFOW tcp_info(void) {
    WSAPROTOCOL_INFOW pi;
    memset(&pi, 0, sizeof pi);
    pi.dwCatalogEntryId = CATALOG_ID;
    pi.iAddressFamily = AF_INET;
    pi.iSocketType = SOCK_STREAM;
    pi.iProtocol = IPPROTO_TCP;
    pi.iVersion = 2;
    pi.ProtocolChain.ChainLen = 1;
    return pi;
}

#endif
