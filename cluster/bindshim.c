/* bindshim: make "listen on all interfaces" mean "listen on this node's address".
 *
 * Ray 2.60's C++ gRPC servers (GCS, raylet node/object manager, core workers, dashboard
 * agent) listen on the wildcard address unless the node IP is 127.0.0.1, and several Python
 * services (autoscaler monitor and dashboard Prometheus endpoints) do the same; there is no
 * flag to bind them to `--node-ip-address`. cluster/local-two-node.sh preloads this library
 * into every Ray process it starts (LD_PRELOAD, inherited by raylet-spawned workers), so a
 * wildcard bind() is rewritten to the node's own address:
 *
 *   AF_INET  0.0.0.0:P -> LLMTRAIN_BIND_IP:P
 *   AF_INET6 [::]:P    -> [::ffff:LLMTRAIN_BIND_IP]:P  (dual-stack socket, IPV6_V6ONLY=0)
 *                      -> [::1]:P                      (IPv6-only socket: loopback)
 *
 * Specific addresses (127.0.0.1, the node IP, Unix sockets) pass through unchanged. With
 * LLMTRAIN_BIND_IP unset or not an IPv4 address the library changes nothing.
 *
 *   gcc -shared -fPIC -O2 -o bindshim.so bindshim.c -ldl
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

static int node_ipv4(struct in_addr *out) {
    const char *ip = getenv("LLMTRAIN_BIND_IP");
    return ip != NULL && inet_pton(AF_INET, ip, out) == 1;
}

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static bind_fn real_bind = NULL;
    if (real_bind == NULL) {
        real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
        if (real_bind == NULL) {
            errno = ENOSYS;
            return -1;
        }
    }
    struct in_addr node;
    if (addr == NULL || !node_ipv4(&node)) {
        return real_bind(fd, addr, len);
    }
    if (addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        struct sockaddr_in v4;
        memcpy(&v4, addr, sizeof v4);
        if (v4.sin_addr.s_addr == htonl(INADDR_ANY)) {
            v4.sin_addr = node;
            return real_bind(fd, (const struct sockaddr *)&v4, sizeof v4);
        }
    } else if (addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 v6;
        memcpy(&v6, addr, sizeof v6);
        if (IN6_IS_ADDR_UNSPECIFIED(&v6.sin6_addr)) {
            int v6only = 0;
            socklen_t optlen = sizeof v6only;
            if (getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &optlen) != 0) {
                v6only = 0;
            }
            if (v6only) {
                v6.sin6_addr = in6addr_loopback;
            } else {
                /* IPv4-mapped form of the node address: ::ffff:a.b.c.d */
                memset(&v6.sin6_addr, 0, sizeof v6.sin6_addr);
                v6.sin6_addr.s6_addr[10] = 0xff;
                v6.sin6_addr.s6_addr[11] = 0xff;
                memcpy(&v6.sin6_addr.s6_addr[12], &node, 4);
            }
            return real_bind(fd, (const struct sockaddr *)&v6, sizeof v6);
        }
    }
    return real_bind(fd, addr, len);
}
