/*
 * fuzz.h: what every fuzz target shares: libFuzzer's entry point and the
 * check that turns a broken property into a crash libFuzzer reports (an
 * assert would vanish with NDEBUG).
 */
#ifndef CHATFCGI_FUZZ_H
#define CHATFCGI_FUZZ_H

#include <stddef.h>
#include <stdint.h>

#define check(cond)                                                            \
    do {                                                                       \
        if (!(cond))                                                           \
            __builtin_trap();                                                  \
    } while (0)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#endif
