// The library's interface as cpu_kernels.py checks and binds it: the version of the C interface it
// was built for (cpu_kernels.py passes -DMOETRON_KERNELS_ABI and refuses a library reporting another,
// a stale build in the cache) and the entry points MOETRON_EXPORT registered (export.h).
#include <string>

#include "export.h"

#ifndef MOETRON_KERNELS_ABI
#error "MOETRON_KERNELS_ABI is undefined: build through moetron/kernels/cpu_kernels.py"
#endif

namespace moetron {

namespace {
// Constant-initialized, so it is null before any Export's constructor runs, in whatever order the
// translation units' static constructors come.
const Export* exports = nullptr;
}  // namespace

Export::Export(const char* name, const char* args) : name(name), args(args), next(exports) { exports = this; }

}  // namespace moetron

extern "C" int moetron_kernels_abi() { return MOETRON_KERNELS_ABI; }

// One "name codes" line per exported entry point.
extern "C" const char* moetron_kernels_exports() {
    static const std::string table = [] {
        std::string lines;
        for (const moetron::Export* e = moetron::exports; e != nullptr; e = e->next) {
            lines += std::string(e->name) + " " + e->args + "\n";
        }
        return lines;
    }();
    return table.c_str();
}
