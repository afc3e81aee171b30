/* counter: prints "COUNTER <n> <checksum>" every half second, n = 1, 2, 3 ..., where checksum
 * is FNV-1a (64-bit) over the decimal values 1..n each followed by '\n'. A host-side checker
 * recomputes it from the values it saw: a lost, repeated or reordered line breaks the chain.
 * Usage: counter [LINES [INTERVAL_MS]]   LINES 0 = forever (default 0), INTERVAL_MS default 500.
 * Prints "COUNTER-DONE <lines> <checksum>" after the last line when LINES > 0. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint64_t fnv1a(uint64_t h, const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)s[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

int main(int argc, char **argv)
{
    unsigned long long lines = argc > 1 ? strtoull(argv[1], NULL, 0) : 0;
    long interval_ms = argc > 2 ? strtol(argv[2], NULL, 0) : 500;
    uint64_t h = 0xcbf29ce484222325ULL;
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (unsigned long long n = 1; lines == 0 || n <= lines; n++) {
        char buf[32];
        int len = snprintf(buf, sizeof buf, "%llu\n", n);
        h = fnv1a(h, buf, (size_t)len);
        printf("COUNTER %llu %016llx\n", n, (unsigned long long)h);
        if (lines != 0 && n == lines)
            break;
        next.tv_nsec += interval_ms * 1000000L;
        while (next.tv_nsec >= 1000000000L) {
            next.tv_nsec -= 1000000000L;
            next.tv_sec++;
        }
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) != 0)
            ;
    }
    if (lines != 0)
        printf("COUNTER-DONE %llu %016llx\n", lines, (unsigned long long)h);
    return 0;
}
