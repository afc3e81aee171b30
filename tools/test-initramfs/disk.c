/* disk: writes or checks a pattern on a block device, for the VMM's virtio-blk tests.
 *
 *   disk write DEV MIB SEED    writes MIB MiB of the pattern from offset 0, fsync()s, and prints
 *                              "DISK write DEV MIB MiB seed SEED sum SUM"
 *   disk verify DEV MIB SEED   reads them back (O_DIRECT: from the device, not the page cache)
 *                              and prints "DISK verify DEV MIB MiB seed SEED sum SUM ok", or
 *                              "DISK verify ... FAIL at byte N" and exits 1
 *   disk cycle DEV MIB SEED N  N rounds of: write the pattern of SEED+r with O_DIRECT (every
 *                              write is a request to the device), fsync, read it back with
 *                              O_DIRECT and compare; prints "DISK round R seed S sum SUM ok"
 *                              per round and "DISK cycle DEV MIB MiB N rounds ok" at the end
 *                              (the disk is busy throughout: a migration lands mid-request)
 *   disk bench DEV MIB KIB     times sequential O_DIRECT writes of KIB KiB (MIB MiB in all),
 *                              an fsync, then the reads back, and prints per direction
 *                              "DISKBENCH write|read MIB MiB KIB KiB SECONDS s MBPS MB/s
 *                              mean LAT us max LAT us" (guest clock; tools' block-bench)
 *
 * The pattern: little-endian 64-bit words, word i of the device = mix(SEED ^ i) (splitmix64's
 * finaliser), so every word differs and a misplaced block shows. SUM is the FNV-1a hash of the
 * bytes, in hex; the host computes both from the image file and compares. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (1u << 20)

static uint64_t mix(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void fill(uint8_t *buf, uint64_t first_word, uint64_t seed)
{
    for (uint64_t i = 0; i < CHUNK / 8; i++) {
        uint64_t v = mix(seed ^ (first_word + i));
        memcpy(buf + i * 8, &v, 8); /* x86: little-endian */
    }
}

static uint64_t fnv(uint64_t h, const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

/* One round of `cycle`: 0, or 1 after printing why. */
static int cycle_round(int fd, const char *dev, uint64_t mib, uint64_t seed, uint64_t round,
                       uint8_t *want, uint8_t *got)
{
    uint64_t sum = 0xcbf29ce484222325ull;
    for (uint64_t c = 0; c < mib; c++) {
        fill(want, c * (CHUNK / 8), seed);
        sum = fnv(sum, want, CHUNK);
        if (pwrite(fd, want, CHUNK, (off_t)(c * CHUNK)) != (ssize_t)CHUNK) {
            printf("DISK round %" PRIu64 " %s: short write at MiB %" PRIu64 ": %m\n", round, dev, c);
            return 1;
        }
    }
    if (fsync(fd) != 0) {
        printf("DISK round %" PRIu64 " %s: fsync: %m\n", round, dev);
        return 1;
    }
    for (uint64_t c = 0; c < mib; c++) {
        fill(want, c * (CHUNK / 8), seed);
        if (pread(fd, got, CHUNK, (off_t)(c * CHUNK)) != (ssize_t)CHUNK) {
            printf("DISK round %" PRIu64 " %s: short read at MiB %" PRIu64 ": %m\n", round, dev, c);
            return 1;
        }
        if (memcmp(got, want, CHUNK)) {
            printf("DISK round %" PRIu64 " %s seed %" PRIu64 " FAIL in MiB %" PRIu64 "\n", round,
                   dev, seed, c);
            return 1;
        }
    }
    printf("DISK round %" PRIu64 " seed %" PRIu64 " sum %016" PRIx64 " ok\n", round, seed, sum);
    fflush(stdout);
    return 0;
}

static int cycle(const char *dev, uint64_t mib, uint64_t seed, uint64_t rounds)
{
    int fd = open(dev, O_RDWR | O_DIRECT);
    if (fd < 0) {
        printf("DISK cycle %s: cannot open: %m\n", dev);
        return 1;
    }
    uint8_t *want, *got;
    if (posix_memalign((void **)&want, 4096, CHUNK) || posix_memalign((void **)&got, 4096, CHUNK)) {
        printf("DISK out of memory\n");
        return 1;
    }
    for (uint64_t r = 0; r < rounds; r++) {
        if (cycle_round(fd, dev, mib, seed + r, r, want, got))
            return 1;
    }
    printf("DISK cycle %s %" PRIu64 " MiB %" PRIu64 " rounds ok\n", dev, mib, rounds);
    close(fd);
    return 0;
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* One direction of `bench`: 0, or 1 after printing why. */
static int bench_pass(int fd, int writing, uint64_t mib, uint64_t kib, uint8_t *buf)
{
    uint64_t n = mib * 1024 / kib, bytes = kib * 1024;
    double start = now(), worst = 0;
    for (uint64_t i = 0; i < n; i++) {
        double t = now();
        ssize_t got = writing ? pwrite(fd, buf, bytes, (off_t)(i * bytes))
                              : pread(fd, buf, bytes, (off_t)(i * bytes));
        if (got != (ssize_t)bytes) {
            printf("DISKBENCH %s: short transfer at request %" PRIu64 ": %m\n",
                   writing ? "write" : "read", i);
            return 1;
        }
        t = now() - t;
        if (t > worst)
            worst = t;
    }
    if (writing && fsync(fd) != 0) {
        printf("DISKBENCH write: fsync: %m\n");
        return 1;
    }
    double s = now() - start;
    printf("DISKBENCH %s %" PRIu64 " MiB %" PRIu64 " KiB %.3f s %.3f MB/s mean %.0f us max %.0f us\n",
           writing ? "write" : "read", mib, kib, s, (double)(mib << 20) / s / 1e6, s / n * 1e6,
           worst * 1e6);
    fflush(stdout);
    return 0;
}

static int bench(const char *dev, uint64_t mib, uint64_t kib)
{
    if (kib == 0 || kib > CHUNK / 1024 || (mib * 1024) % kib) {
        printf("DISKBENCH: KIB must divide MIB MiB and be at most %u\n", CHUNK / 1024);
        return 1;
    }
    int fd = open(dev, O_RDWR | O_DIRECT);
    if (fd < 0) {
        printf("DISKBENCH %s: cannot open: %m\n", dev);
        return 1;
    }
    uint8_t *buf;
    if (posix_memalign((void **)&buf, 4096, CHUNK)) {
        printf("DISKBENCH out of memory\n");
        return 1;
    }
    fill(buf, 0, 1);
    if (bench_pass(fd, 1, mib, kib, buf) || bench_pass(fd, 0, mib, kib, buf))
        return 1;
    close(fd);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 5 && !strcmp(argv[1], "bench"))
        return bench(argv[2], strtoull(argv[3], NULL, 0), strtoull(argv[4], NULL, 0));
    if (argc == 6 && !strcmp(argv[1], "cycle"))
        return cycle(argv[2], strtoull(argv[3], NULL, 0), strtoull(argv[4], NULL, 0),
                     strtoull(argv[5], NULL, 0));
    if (argc != 5 || (strcmp(argv[1], "write") && strcmp(argv[1], "verify"))) {
        fprintf(stderr, "usage: disk write|verify DEV MIB SEED | disk cycle DEV MIB SEED ROUNDS | "
                        "disk bench DEV MIB KIB\n");
        return 2;
    }
    int writing = !strcmp(argv[1], "write");
    const char *dev = argv[2];
    uint64_t mib = strtoull(argv[3], NULL, 0);
    uint64_t seed = strtoull(argv[4], NULL, 0);
    int fd = open(dev, writing ? O_WRONLY : (O_RDONLY | O_DIRECT));
    if (fd < 0) {
        printf("DISK %s %s: cannot open: %m\n", argv[1], dev);
        return 1;
    }
    uint8_t *want, *got;
    if (posix_memalign((void **)&want, 4096, CHUNK) || posix_memalign((void **)&got, 4096, CHUNK)) {
        printf("DISK out of memory\n");
        return 1;
    }
    uint64_t sum = 0xcbf29ce484222325ull;
    for (uint64_t c = 0; c < mib; c++) {
        fill(want, c * (CHUNK / 8), seed);
        sum = fnv(sum, want, CHUNK);
        off_t at = (off_t)(c * CHUNK);
        if (writing) {
            if (pwrite(fd, want, CHUNK, at) != (ssize_t)CHUNK) {
                printf("DISK write %s: short write at byte %" PRIu64 ": %m\n", dev, (uint64_t)at);
                return 1;
            }
        } else {
            if (pread(fd, got, CHUNK, at) != (ssize_t)CHUNK) {
                printf("DISK verify %s: short read at byte %" PRIu64 ": %m\n", dev, (uint64_t)at);
                return 1;
            }
            for (uint64_t i = 0; i < CHUNK; i++) {
                if (got[i] != want[i]) {
                    printf("DISK verify %s %" PRIu64 " MiB seed %" PRIu64 " FAIL at byte %" PRIu64
                           "\n", dev, mib, seed, (uint64_t)at + i);
                    return 1;
                }
            }
        }
    }
    if (writing && fsync(fd) != 0) {
        printf("DISK write %s: fsync: %m\n", dev);
        return 1;
    }
    printf("DISK %s %s %" PRIu64 " MiB seed %" PRIu64 " sum %016" PRIx64 "%s\n", argv[1], dev, mib,
           seed, sum, writing ? "" : " ok");
    close(fd);
    return 0;
}
