// How the emulated runtime finds and calls a kernel: a registry from kernel name to a runner that
// unpacks the launch's argument buffer into the kernel's parameters. The build
// (scripts/build-hip-emulator.sh) compiles each kernels/*.cu with one EMU_KERNEL(name) line per
// kernel it declares appended.
#pragma once

#include <array>
#include <cstddef>
#include <cstring>
#include <string>
#include <utility>

namespace emu {

// The kernel argument buffer as hipModuleLaunchKernel's `extra` gives it: each argument at the
// next offset aligned to its size (AMD's kernarg layout, which src/hip/runtime.rs packs).
struct Arguments {
    const unsigned char* bytes;
    std::size_t size;
};

using Runner = void (*)(const Arguments&);

struct Kernel {
    Runner run;
    std::size_t arg_bytes;  // the size the kernel's parameter list packs to
};

// Adds a kernel under `name` (at library load time, from the static objects below).
void register_kernel(const std::string& name, Kernel kernel);
// The kernel of that name, or nullptr.
const Kernel* find_kernel(const std::string& name);
template <typename... A> constexpr std::array<std::size_t, sizeof...(A) + 1> argument_offsets() {
    std::array<std::size_t, sizeof...(A) + 1> at{};
    std::size_t offset = 0, i = 0;
    ((offset = (offset + alignof(A) - 1) / alignof(A) * alignof(A), at[i++] = offset, offset += sizeof(A)), ...);
    at[i] = offset;  // the total
    return at;
}

template <typename A> A argument_at(const Arguments& args, std::size_t offset) {
    A value;
    std::memcpy(&value, args.bytes + offset, sizeof(A));
    return value;
}

template <auto KERNEL> struct Unpack;
template <typename... A, void (*KERNEL)(A...)> struct Unpack<KERNEL> {
    static constexpr auto offsets = argument_offsets<A...>();
    template <std::size_t... I> static void call(const Arguments& args, std::index_sequence<I...>) {
        KERNEL(argument_at<A>(args, offsets[I])...);
    }
    static void run(const Arguments& args) { call(args, std::index_sequence_for<A...>{}); }
    static constexpr std::size_t bytes = offsets[sizeof...(A)];
};

struct Registration {
    Registration(const char* name, Kernel kernel) { register_kernel(name, kernel); }
};

}  // namespace emu

#define EMU_KERNEL(name) \
    static emu::Registration emu_registration_##name(#name, {&emu::Unpack<&name>::run, emu::Unpack<&name>::bytes});
