/* CPU memory bandwidth: read, write, copy, triad and in-place update passes over caller-owned
 * buffers, split over pthreads each pinned to one given CPU. Allocation and placement belong to
 * the Python side. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { KIND_READ = 0, KIND_WRITE = 1, KIND_COPY = 2, KIND_TRIAD = 3, KIND_UPDATE = 4 };

typedef struct {
    int kind;
    int cpu;
    int passes;
    double *a, *b, *c;
    size_t count; /* doubles in this thread's slice */
    atomic_int *ready; /* threads pinned and waiting */
    atomic_int *go;    /* 1: start, -1: abort (a sibling thread could not be created) */
    int pin_failed;
    double checksum;
} job_t;

/* Sixteen lanes in four vector sums: independent add chains written out, so the rate does not
 * depend on how a compiler vectorises a reduction it may not reorder (gcc -O3 extracts the lanes
 * of a loaded vector and adds them one by one, slower than -O2's code). */
typedef double v4d __attribute__((vector_size(32)));

static double read_pass(const double *a, size_t n) {
    v4d s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        v4d x0, x1, x2, x3;
        memcpy(&x0, a + i, sizeof x0);
        memcpy(&x1, a + i + 4, sizeof x1);
        memcpy(&x2, a + i + 8, sizeof x2);
        memcpy(&x3, a + i + 12, sizeof x3);
        s0 += x0;
        s1 += x1;
        s2 += x2;
        s3 += x3;
    }
    v4d s = (s0 + s1) + (s2 + s3);
    double sum = s[0] + s[1] + s[2] + s[3];
    for (; i < n; i++) sum += a[i];
    return sum;
}

static void *worker(void *arg) {
    job_t *job = (job_t *)arg;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(job->cpu, &set);
    job->pin_failed = pthread_setaffinity_np(pthread_self(), sizeof(set), &set) != 0;
    atomic_fetch_add(job->ready, 1);
    /* Spin rather than block so every thread leaves the gate within nanoseconds of the others. */
    while (atomic_load(job->go) == 0) sched_yield();
    if (job->pin_failed || atomic_load(job->go) < 0) return NULL;
    size_t n = job->count;
    double *a = job->a, *b = job->b, *c = job->c;
    double sum = 0;
    for (int p = 0; p < job->passes; p++) {
        const double scalar = 3.0 + p;
        switch (job->kind) {
        case KIND_READ:
            sum += read_pass(a, n);
            break;
        case KIND_WRITE:
            for (size_t i = 0; i < n; i++) a[i] = scalar;
            break;
        case KIND_COPY:
            for (size_t i = 0; i < n; i++) b[i] = a[i];
            break;
        case KIND_TRIAD:
            for (size_t i = 0; i < n; i++) a[i] = b[i] + scalar * c[i];
            break;
        case KIND_UPDATE: {
            /* An optimizer's access pattern: read two arrays, write one of them back in place, so
             * every written line was just read (no write-allocate). Shrinking keeps values finite
             * over many passes. */
            const double shrink = 1.0 / scalar;
            for (size_t i = 0; i < n; i++) a[i] = a[i] * shrink + b[i];
            break;
        }
        }
    }
    job->checksum = sum;
    return NULL;
}

/* Run `passes` passes of `kind` over arrays of `nbytes` each, split evenly over `nthreads` threads
 * pinned to cpus[0..nthreads). Returns the seconds from the common start to the last thread's end,
 * -1 for bad arguments, -2 when a thread could not be created, -3 when a CPU could not be pinned. */
double stream_seconds(int kind, void *a, void *b, void *c, size_t nbytes, const int *cpus,
                      int nthreads, int passes, double *checksum) {
    if (nthreads < 1 || passes < 1 || kind < KIND_READ || kind > KIND_UPDATE) return -1;
    size_t total = nbytes / sizeof(double);
    job_t *jobs = calloc((size_t)nthreads, sizeof(job_t));
    pthread_t *threads = calloc((size_t)nthreads, sizeof(pthread_t));
    if (!jobs || !threads) {
        free(jobs);
        free(threads);
        return -2;
    }
    atomic_int ready = 0, go = 0;
    int created = 0;
    for (int t = 0; t < nthreads; t++) {
        size_t lo = total * (size_t)t / (size_t)nthreads;
        size_t hi = total * (size_t)(t + 1) / (size_t)nthreads;
        jobs[t] = (job_t){kind, cpus[t], passes, (double *)a + lo, b ? (double *)b + lo : NULL,
                          c ? (double *)c + lo : NULL, hi - lo, &ready, &go, 0, 0.0};
        if (pthread_create(&threads[t], NULL, worker, &jobs[t]) != 0) break;
        created++;
    }
    while (atomic_load(&ready) < created) sched_yield();
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    atomic_store(&go, created == nthreads ? 1 : -1);
    double sum = 0;
    int pin_failed = 0;
    for (int t = 0; t < created; t++) {
        pthread_join(threads[t], NULL);
        sum += jobs[t].checksum;
        pin_failed |= jobs[t].pin_failed;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    free(jobs);
    free(threads);
    if (checksum) *checksum = sum;
    if (created < nthreads) return -2;
    if (pin_failed) return -3;
    return (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9;
}
