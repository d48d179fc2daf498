/*
 * What the C test programs share: pass/fail counting (CHECK goes on, REQUIRE ends the process
 * with the count) and bounded waiting. Included by one translation unit per program.
 */
#ifndef SANPATH_TEST_CHECK_H
#define SANPATH_TEST_CHECK_H

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static int passed, failed;

#define CHECK(cond, ...)                                                                        \
    do {                                                                                        \
        if (cond) {                                                                             \
            passed++;                                                                           \
        } else {                                                                                \
            failed++;                                                                           \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);                     \
            fprintf(stderr, __VA_ARGS__);                                                       \
            fputc('\n', stderr);                                                                \
        }                                                                                       \
    } while (0)

/* Like CHECK, but stops the run on failure. `cond` is evaluated once. */
#define REQUIRE(cond, ...)                                                                      \
    do {                                                                                        \
        if (cond) {                                                                             \
            passed++;                                                                           \
        } else {                                                                                \
            failed++;                                                                           \
            fprintf(stderr, "FATAL %s:%d: %s: ", __FILE__, __LINE__, #cond);                    \
            fprintf(stderr, __VA_ARGS__);                                                       \
            fprintf(stderr, "\n%d passed, %d failed\n", passed, failed);                        \
            exit(2);                                                                            \
        }                                                                                       \
    } while (0)

static inline double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static inline void sleep_ms(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

/* Evaluates `cond` until it holds or `secs` passed; the result is in `ok`. */
#define WAIT_UNTIL(ok, cond, secs)                                                              \
    do {                                                                                        \
        double deadline_ = now() + (secs);                                                      \
        for (;;) {                                                                              \
            if (cond) {                                                                         \
                (ok) = 1;                                                                       \
                break;                                                                          \
            }                                                                                   \
            if (now() > deadline_) {                                                            \
                (ok) = 0;                                                                       \
                break;                                                                          \
            }                                                                                   \
            sleep_ms(1);                                                                        \
        }                                                                                       \
    } while (0)

#endif
