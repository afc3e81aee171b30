/* net: brings up eth0 and exchanges a pattern with a host-side peer over TCP, for the VMM's
 * virtio-net tests.
 *
 *   net ADDR PREFIX PEER PORT BYTES SEED
 *       sets ADDR/PREFIX on eth0 and brings it up (ioctls: no `ip` process, each of which costs
 *       seconds on a software KVM), prints "NET eth0 mac MAC", connects to PEER:PORT (retrying
 *       for 60 s while the link comes up), sends BYTES bytes of the pattern of SEED, shuts its
 *       sending side, and reads until the peer closes. It prints
 *           NET sent BYTES sum SUM
 *           NET received N sum SUM ok|FAIL
 *       where "ok" means the peer sent exactly BYTES bytes of the pattern of SEED+1; exits 0
 *       when both ways are whole. The connection starts with the round number (8 bytes,
 *       little-endian; 0 here), so a peer knows which pattern to expect.
 *   net ADDR PREFIX PEER PORT BYTES SEED ROUNDS
 *       the same ROUNDS times, a new connection each, round R sending the pattern of SEED+2R and
 *       expecting SEED+2R+1; a round that fails (its connection reset: the VM moved to another
 *       host, whose peer never heard of it) is tried again for up to 180 s. Prints
 *           NET round R sent BYTES sum SUM received BYTES sum SUM in T s ok
 *       per round and "NET cycle ROUNDS rounds ok" at the end.
 *
 * The pattern: little-endian 64-bit words, word i = mix(SEED ^ i) (splitmix64's finaliser, as
 * disk.c has it). SUM is the FNV-1a hash of the bytes, in hex; the peer computes both. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <net/if.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static uint64_t mix(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Byte k of the pattern of seed. */
static uint8_t pattern_byte(uint64_t seed, uint64_t k)
{
    uint64_t w = mix(seed ^ (k / 8));
    return (uint8_t)(w >> (8 * (k % 8)));
}

static uint64_t fnv(uint64_t h, const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

static int fail(const char *what)
{
    printf("NET %s failed: %s\n", what, strerror(errno));
    fflush(stdout);
    return 1;
}

static int set_addr(int s, unsigned long req, const char *ifname, in_addr_t a)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
    sin->sin_family = AF_INET;
    sin->sin_addr.s_addr = a;
    return ioctl(s, req, &ifr);
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

/* One exchange: connects to peer:port (retrying for connect_for seconds), sends the round
 * number (8 bytes, little-endian) and BYTES bytes of the pattern of SEED, shuts its side, and
 * reads until the peer closes, checking the pattern of SEED+1. Prints what it did (in a round,
 * one line with "NET round R"), and returns 0 when both ways are whole. */
static int exchange(in_addr_t peer, int port, uint64_t round, uint64_t bytes, uint64_t seed,
                    int connect_for, int in_rounds)
{
    static uint8_t buf[1 << 16];
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(port)};
    to.sin_addr.s_addr = peer;
    int c = -1;
    double start = now();
    for (;;) {
        c = socket(AF_INET, SOCK_STREAM, 0);
        if (c < 0)
            return fail("socket");
        if (connect(c, (struct sockaddr *)&to, sizeof to) == 0)
            break;
        int e = errno;
        close(c);
        if (now() - start > connect_for) {
            errno = e;
            return fail("connect");
        }
        sleep(1);
    }
    uint64_t sent = 0, h = 0xcbf29ce484222325ull;
    double t0 = now();
    memcpy(buf, &round, 8); /* x86: little-endian */
    if (write(c, buf, 8) != 8) {
        close(c);
        return fail("write");
    }
    while (sent < bytes) {
        size_t n = bytes - sent < sizeof buf ? bytes - sent : sizeof buf;
        for (size_t i = 0; i < n; i++)
            buf[i] = pattern_byte(seed, sent + i);
        size_t off = 0;
        while (off < n) {
            ssize_t w = write(c, buf + off, n - off);
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0) {
                close(c);
                return fail("write");
            }
            off += w;
        }
        h = fnv(h, buf, n);
        sent += n;
    }
    double t1 = now();
    if (!in_rounds) {
        printf("NET sent %" PRIu64 " sum %016" PRIx64 " in %.3f s\n", sent, h, t1 - t0);
        fflush(stdout);
    }
    if (shutdown(c, SHUT_WR) < 0) {
        close(c);
        return fail("shutdown");
    }
    uint64_t got = 0, rh = 0xcbf29ce484222325ull, bad_at = UINT64_MAX;
    for (;;) {
        ssize_t r = read(c, buf, sizeof buf);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            close(c);
            return fail("read");
        }
        if (r == 0)
            break;
        for (ssize_t i = 0; i < r && bad_at == UINT64_MAX; i++)
            if (got + i >= bytes || buf[i] != pattern_byte(seed + 1, got + i))
                bad_at = got + i;
        rh = fnv(rh, buf, r);
        got += r;
    }
    close(c);
    int ok = got == bytes && bad_at == UINT64_MAX;
    if (in_rounds)
        printf("NET round %" PRIu64 " sent %" PRIu64 " sum %016" PRIx64 " received %" PRIu64
               " sum %016" PRIx64 " in %.3f s %s\n",
               round, sent, h, got, rh, now() - t0, ok ? "ok" : "FAIL");
    else
        printf("NET received %" PRIu64 " sum %016" PRIx64 " in %.3f s %s\n", got, rh,
               now() - t1, ok ? "ok" : "FAIL");
    if (!ok && bad_at != UINT64_MAX)
        printf("NET first wrong byte at %" PRIu64 "\n", bad_at);
    fflush(stdout);
    return ok ? 0 : -1;
}

int main(int argc, char **argv)
{
    if (argc != 7 && argc != 8) {
        fprintf(stderr, "usage: net ADDR PREFIX PEER PORT BYTES SEED [ROUNDS]\n");
        return 2;
    }
    const char *ifname = "eth0";
    in_addr_t addr = inet_addr(argv[1]);
    int prefix = atoi(argv[2]);
    in_addr_t peer = inet_addr(argv[3]);
    int port = atoi(argv[4]);
    uint64_t bytes = strtoull(argv[5], NULL, 0);
    uint64_t seed = strtoull(argv[6], NULL, 0);
    uint64_t rounds = argc == 8 ? strtoull(argv[7], NULL, 0) : 0;
    if (addr == INADDR_NONE || peer == INADDR_NONE || prefix < 1 || prefix > 32) {
        fprintf(stderr, "net: bad address or prefix\n");
        return 2;
    }
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0)
        return fail("socket");
    if (set_addr(s, SIOCSIFADDR, ifname, addr) < 0)
        return fail("SIOCSIFADDR eth0");
    if (set_addr(s, SIOCSIFNETMASK, ifname, htonl(~0u << (32 - prefix))) < 0)
        return fail("SIOCSIFNETMASK eth0");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
        return fail("SIOCGIFFLAGS eth0");
    ifr.ifr_flags |= IFF_UP;
    if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
        return fail("SIOCSIFFLAGS eth0");
    if (ioctl(s, SIOCGIFHWADDR, &ifr) < 0)
        return fail("SIOCGIFHWADDR eth0");
    const uint8_t *m = (const uint8_t *)ifr.ifr_hwaddr.sa_data;
    printf("NET %s mac %02x:%02x:%02x:%02x:%02x:%02x\n", ifname, m[0], m[1], m[2], m[3], m[4],
           m[5]);
    fflush(stdout);
    close(s);

    if (rounds == 0)
        return exchange(peer, port, 0, bytes, seed, 60, 0) == 0 ? 0 : 1;
    /* Rounds: a failed one (its connection reset, e.g. because the VM moved to another host
     * and the peer there never heard of it) is tried again, for up to 180 s. */
    for (uint64_t r = 0; r < rounds; r++) {
        double start = now();
        while (exchange(peer, port, r, bytes, seed + 2 * r, 60, 1) != 0) {
            if (now() - start > 180) {
                printf("NET round %" PRIu64 " FAIL\n", r);
                return 1;
            }
            sleep(1);
        }
    }
    printf("NET cycle %" PRIu64 " rounds ok\n", rounds);
    return 0;
}
