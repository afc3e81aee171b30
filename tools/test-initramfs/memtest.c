/* memtest: writes a pattern over most of the guest's RAM and verifies it, several passes.
 * Usage: memtest [SIZE [PASSES [FREE HOLD]]]   SIZE in MiB ("64") or a percentage of
 * MemAvailable ("80%"); default 80%, PASSES default 2. With FREE (MiB) and HOLD (seconds): after
 * the first pass's writes, touches FREE MiB more, prints "memtest: touched FREE MiB", frees them
 * (munmap), prints "memtest: freed FREE MiB, holding HOLD s", and for HOLD seconds verifies its
 * own pages once a second (a balloon's free page reporting hands the freed ones to the host
 * meanwhile, and the host may inflate the balloon); then goes on with its passes. Each 8-byte word holds f(page address, word index, pass), so a
 * page that reads back zeroed, stale (an earlier pass) or another page's content fails.
 * Prints progress lines and ends with "memtest: PASS <pages> pages" (exit 0) or
 * "memtest: FAIL <reason>" (exit 1). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define WORDS (PAGE / sizeof(uint64_t))

static uint64_t pattern(uint64_t page_addr, uint64_t word, uint64_t pass)
{
    uint64_t x = page_addr ^ (word << 3) ^ (pass * 0x9e3779b97f4a7c15ULL);
    x ^= x >> 33; /* murmur3 finaliser: every input bit changes the word */
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x | 1; /* never 0: a zeroed page never matches */
}

static unsigned long mem_available_kib(void)
{
    FILE *f = fopen("/proc/meminfo", "r");
    char line[128];
    unsigned long kib = 0;
    if (!f)
        return 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %lu kB", &kib) == 1)
            break;
    fclose(f);
    return kib;
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    const char *size_arg = argc > 1 ? argv[1] : "80%";
    unsigned long passes = argc > 2 ? strtoul(argv[2], NULL, 0) : 2;
    unsigned long free_mib = argc > 3 ? strtoul(argv[3], NULL, 0) : 0;
    unsigned long hold = argc > 4 ? strtoul(argv[4], NULL, 0) : 0;
    unsigned long avail = mem_available_kib();
    unsigned long mib;
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (size_arg[0] && size_arg[strlen(size_arg) - 1] == '%')
        mib = avail / 1024 * strtoul(size_arg, NULL, 10) / 100;
    else
        mib = strtoul(size_arg, NULL, 10);
    if (mib == 0 || passes == 0) {
        printf("memtest: FAIL bad arguments (size %s = %lu MiB, MemAvailable %lu KiB, passes %lu)\n",
               size_arg, mib, avail, passes);
        return 1;
    }
    unsigned long pages = mib * (1024 * 1024 / PAGE);
    printf("memtest: %lu MiB (%lu pages) of MemAvailable %lu MiB, %lu passes\n", mib, pages,
           avail / 1024, passes);
    uint64_t *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (mem == MAP_FAILED) {
        printf("memtest: FAIL mmap of %lu MiB failed\n", mib);
        return 1;
    }
    unsigned long step = pages / 4 ? pages / 4 : 1;
    for (unsigned long pass = 1; pass <= passes; pass++) {
        double t0 = now();
        for (unsigned long p = 0; p < pages; p++) {
            uint64_t *pg = mem + p * WORDS;
            for (unsigned long w = 0; w < WORDS; w++)
                pg[w] = pattern((uint64_t)(uintptr_t)pg, w, pass);
            if ((p + 1) % step == 0)
                printf("memtest: pass %lu wrote %lu/%lu pages\n", pass, p + 1, pages);
        }
        double t1 = now();
        if (pass == 1 && free_mib) {
            size_t len = free_mib * 1024 * 1024;
            char *extra = mmap(NULL, len, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
            if (extra == MAP_FAILED) {
                printf("memtest: FAIL mmap of %lu MiB more failed\n", free_mib);
                return 1;
            }
            for (size_t o = 0; o < len; o += PAGE)
                extra[o] = 1;
            printf("memtest: touched %lu MiB\n", free_mib);
            munmap(extra, len);
            printf("memtest: freed %lu MiB, holding %lu s\n", free_mib, hold);
            /* Meanwhile its own pages are checked every second: whatever the host takes back
             * (reported free pages, a balloon's), these must stay as written. */
            double end = now() + hold;
            unsigned long rounds = 0;
            while (now() < end) {
                for (unsigned long p = 0; p < pages; p++) {
                    uint64_t *pg = mem + p * WORDS;
                    for (unsigned long w = 0; w < WORDS; w++)
                        if (pg[w] != pattern((uint64_t)(uintptr_t)pg, w, pass)) {
                            printf("memtest: FAIL page %lu word %lu changed while holding\n", p, w);
                            return 1;
                        }
                }
                rounds++;
                sleep(1);
            }
            printf("memtest: held %lu s, its %lu pages verified %lu times\n", hold, pages, rounds);
            t0 += now() - t1; /* the pass's write time leaves the hold out */
            t1 = now();
        }
        unsigned long bad_pages = 0;
        for (unsigned long p = 0; p < pages; p++) {
            uint64_t *pg = mem + p * WORDS;
            for (unsigned long w = 0; w < WORDS; w++) {
                uint64_t want = pattern((uint64_t)(uintptr_t)pg, w, pass);
                if (pg[w] != want) {
                    if (bad_pages < 10)
                        printf("memtest: pass %lu page %lu word %lu: read %016llx, want %016llx\n",
                               pass, p, w, (unsigned long long)pg[w], (unsigned long long)want);
                    bad_pages++;
                    break;
                }
            }
            if ((p + 1) % step == 0)
                printf("memtest: pass %lu verified %lu/%lu pages\n", pass, p + 1, pages);
        }
        double t2 = now();
        printf("memtest: pass %lu write %.2f s, verify %.2f s\n", pass, t1 - t0, t2 - t1);
        if (bad_pages) {
            printf("memtest: FAIL %lu of %lu pages wrong in pass %lu\n", bad_pages, pages, pass);
            return 1;
        }
    }
    printf("memtest: PASS %lu pages\n", pages);
    return 0;
}
