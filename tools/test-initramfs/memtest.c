/* memtest: writes a pattern over most of the guest's RAM and verifies it, several passes.
 * Usage: memtest [SIZE [PASSES]]   SIZE in MiB ("64") or a percentage of MemAvailable ("80%");
 * default 80%, PASSES default 2. Each 8-byte word holds f(page address, word index, pass), so a
 * page that reads back zeroed, stale (an earlier pass) or another page's content fails.
 * Prints progress lines and ends with "memtest: PASS <pages> pages" (exit 0) or
 * "memtest: FAIL <reason>" (exit 1). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

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
