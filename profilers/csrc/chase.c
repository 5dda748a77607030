/* Idle load-to-use latency: a dependent pointer chase over a random single cycle of cache lines.
 * Only the inner loops live here; buffers, placement and statistics belong to the Python side. */
#include <stddef.h>
#include <stdint.h>
#include <time.h>

/* splitmix64: a fast, well-mixed generator so the shuffle does not depend on libc's rand(). */
static uint64_t next_random(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Link the first word of every `line_bytes` line of `buf` into one random cycle over all lines.
 * Sattolo's shuffle yields a single cycle, so a chase started anywhere visits every line; the
 * indices are shuffled in place in the lines themselves, so no side array is needed even at GiBs.
 * Returns the number of lines, or 0 when the buffer holds fewer than 2 lines. */
size_t chase_build(void *buf, size_t nbytes, size_t line_bytes, uint64_t seed) {
    char *base = (char *)buf;
    size_t nlines = nbytes / line_bytes;
    if (nlines < 2 || line_bytes < sizeof(void *)) return 0;
    for (size_t i = 0; i < nlines; i++) *(uint64_t *)(base + i * line_bytes) = i;
    uint64_t state = seed;
    for (size_t i = nlines - 1; i > 0; i--) {
        size_t j = (size_t)(next_random(&state) % i);
        uint64_t *a = (uint64_t *)(base + i * line_bytes);
        uint64_t *b = (uint64_t *)(base + j * line_bytes);
        uint64_t t = *a;
        *a = *b;
        *b = t;
    }
    for (size_t i = 0; i < nlines; i++) {
        uint64_t *slot = (uint64_t *)(base + i * line_bytes);
        *(void **)slot = base + (size_t)(*slot) * line_bytes;
    }
    return nlines;
}

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

/* Follow the chain from `start` for at least `nloads` dependent loads; return ns per load.
 * The end pointer is stored in *sink so the compiler cannot drop the loop. */
double chase_ns_per_load(void *start, uint64_t nloads, void **sink) {
    void **p = (void **)start;
    uint64_t rounds = (nloads + 15) / 16;
    double t0 = now_ns();
    for (uint64_t r = 0; r < rounds; r++) {
        /* 16 loads per round keep the loop's own cost out of the per-load figure. */
        p = (void **)*p; p = (void **)*p; p = (void **)*p; p = (void **)*p;
        p = (void **)*p; p = (void **)*p; p = (void **)*p; p = (void **)*p;
        p = (void **)*p; p = (void **)*p; p = (void **)*p; p = (void **)*p;
        p = (void **)*p; p = (void **)*p; p = (void **)*p; p = (void **)*p;
    }
    double t1 = now_ns();
    *sink = (void *)p;
    return (t1 - t0) / (double)(rounds * 16);
}
