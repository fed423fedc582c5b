// Each C entry point declares its Python binding here, once: MOETRON_EXPORT(fn) after its
// definition derives fn's argument codes from its C signature and registers them, and
// moetron_kernels_exports() (abi.cpp) hands the list to cpu_kernels.py, which sets the ctypes
// argtypes from it. A signature is thus written only in C, and the compiler derives the rest.
#pragma once

#include <stdint.h>

#include <type_traits>

namespace moetron {

// p pointer, i int64, n int, f float: the codes cpu_kernels.py maps to ctypes types.
template <typename T>
constexpr char arg_code() {
    if constexpr (std::is_pointer_v<T>) {
        return 'p';
    } else if constexpr (std::is_same_v<T, int64_t>) {
        return 'i';
    } else if constexpr (std::is_same_v<T, int>) {
        return 'n';
    } else if constexpr (std::is_same_v<T, float>) {
        return 'f';
    } else {
        static_assert(sizeof(T) == 0, "an entry point argument with no ctypes code");
    }
}

// Only void functions match: cpu_kernels.py binds every entry point with restype None.
template <typename... Args>
const char* arg_codes(void (*)(Args...)) {
    static constexpr char codes[] = {arg_code<Args>()..., '\0'};
    return codes;
}

// One node per entry point in a list built while the library loads (static constructors).
struct Export {
    const char* name;
    const char* args;
    const Export* next;
    Export(const char* name, const char* args);
};

}  // namespace moetron

#define MOETRON_EXPORT(fn) static const moetron::Export fn##_export(#fn, moetron::arg_codes(&fn))
