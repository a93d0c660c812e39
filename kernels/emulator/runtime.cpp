// An emulated AMD GPU: the part of the HIP runtime API that src/hip/runtime.rs calls, implemented
// on the CPU, linked with the kernels compiled as C++ (kernels/emulator/device.h) into one
// libamdhip64.so.5 (scripts/build-hip-emulator.sh). Put its folder on LD_LIBRARY_PATH and the
// unchanged HIP binary (`mhc-train-hip selftest --device hip`) runs its kernels here.
// Built with MHC_EMULATE_NVIDIA (`build-hip-emulator.sh --nvidia`), the same library is an
// emulated NVIDIA GPU instead: the kernels' CUDA forms (32-lane warps, tensor-core products),
// launched by the same HIP binary under NVIDIA's launch rules (it knows the device by its name).
//
// What it checks that the hardware would not report as clearly: each code object handed to
// hipModuleLoadData must be an AMD GPU ELF, and a kernel is found only in the module whose code
// object lists it (as on the GPU); the launch's argument buffer must have exactly the size the
// kernel's parameter list packs to; fresh allocations hold NaN bytes (0xff), so reading memory
// nothing wrote shows. One device, gfx942 (its code objects list the kernels), 64-lane waves (32
// for NVIDIA), 4 compute units (small grids keep the emulation fast; the launch rules read the
// count). Work runs at once on the calling thread: streams, events and synchronisation are
// trivially in order.
#include <hip/hip_runtime_api.h>

#include <elf.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "threads.h"
#include "launch.h"

namespace emu {

constexpr int COMPUTE_UNITS = 4;
constexpr int MAX_THREADS_PER_BLOCK = 1024;
#if defined(MHC_EMULATE_NVIDIA)
// As src/hip/runtime.rs's EMULATED_NVIDIA_NAME, which makes the launch layer apply NVIDIA's
// rules (32-lane warps, tensor-core forms) to it.
constexpr const char* DEVICE_NAME = "CPU emulation of an NVIDIA GPU (the kernels' CUDA forms, 32-lane warps)";
constexpr std::size_t MAX_DYNAMIC_SHARED = 227 << 10;  // sm_90's opt-in limit per block
#else
constexpr const char* DEVICE_NAME = "CPU emulation of a 64-lane AMD GPU (gfx942)";
constexpr std::size_t MAX_DYNAMIC_SHARED = 64 << 10;  // gfx942's LDS per workgroup
#endif
// Each thread of a block is a fiber (its own stack); the block's fibers take turns on the calling
// OS thread until each one waits at a barrier or returns. Barriers are where they meet: when
// every live thread of the block waits at __syncthreads, or every live lane of a wave waits at
// its shuffle, those threads run again. Deterministic, and cheap enough (one stack switch per
// thread per barrier) to run the selftest's cases in minutes.
constexpr std::size_t FIBER_STACK = 256 << 10;

[[noreturn]] void fault(const std::string& what) {
    std::fprintf(stderr, "hip-emulator: kernel fault: %s\n", what.c_str());
    std::fflush(stderr);
    std::abort();
}

#if !defined(__x86_64__)
#error "the emulator's fiber switch (emu_switch_stack) is written for x86-64"
#endif
// Saves the callee-saved registers on the current stack, stores the stack pointer in *from,
// loads `to` and pops the registers saved there: a switch between fibers. glibc's swapcontext
// does the same plus a signal-mask system call per switch, which was most of the run time.
extern "C" void emu_switch_stack(void** from, void* to);
asm(R"(
    .text
    .globl emu_switch_stack
    .type emu_switch_stack, @function
emu_switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch_stack, .-emu_switch_stack
)");

enum class State { Runnable, AtBlockBarrier, AtWaveBarrier, Done };

struct Fiber {
    void* sp = nullptr;  // saved stack pointer while switched out
    char* stack = nullptr;
    State state = State::Runnable;
    int linear = 0;
};

struct Block {
    std::vector<Fiber> fibers;
    float slot[MAX_THREADS_PER_BLOCK] = {};  // shuffle values, by thread
    void* scheduler_sp = nullptr;
};

thread_local dim3 thread_idx, block_idx, block_dim, grid_dim;
thread_local Block* current_block = nullptr;
thread_local Fiber* current_fiber = nullptr;

// Back to the scheduler, in state `state`, until it makes this fiber runnable again.
void block_on(State state) {
    current_fiber->state = state;
    emu_switch_stack(&current_fiber->sp, current_block->scheduler_sp);
}

void sync_block() { block_on(State::AtBlockBarrier); }
void sync_wave() { block_on(State::AtWaveBarrier); }
int lane_id() { return current_fiber->linear % WAVE; }

// The launch's dynamic shared memory (one block runs at a time), 128-byte aligned as the GPU's
// (the kernels declare it so, and WMMA loads from it need 32-byte alignment).
struct DynamicShared {
    std::unique_ptr<unsigned char[], decltype(&std::free)> bytes{nullptr, &std::free};
    std::size_t size = 0;
    void resize(std::size_t n) {
        if (n > size) {
            bytes.reset(static_cast<unsigned char*>(std::aligned_alloc(128, (n + 127) / 128 * 128)));
            if (!bytes) fault("out of memory for dynamic shared memory");
        }
        size = std::max(size, n);
    }
    void poison() { std::memset(bytes.get(), 0xff, size); }
};
thread_local DynamicShared dynamic_shared_memory;
unsigned char* dynamic_shared() { return dynamic_shared_memory.bytes.get(); }

float shuffle_xor(float v, int lane_mask) {
    Block& block = *current_block;
    const int lane = current_fiber->linear % WAVE, first = current_fiber->linear - lane;
    const int lanes = std::min<int>(WAVE, int(block.fibers.size()) - first);
    const int source = lane ^ lane_mask;
    if (source < 0 || source >= lanes)
        fault("shuffle from lane " + std::to_string(source) + " of a wave of " + std::to_string(lanes) + " lanes");
    block.slot[current_fiber->linear] = v;
    block_on(State::AtWaveBarrier);
    // Every live lane of the wave has written its slot; a lane that returned has not.
    if (block.fibers[first + source].state == State::Done)
        fault("shuffle from lane " + std::to_string(source) + ", which has returned");
    const float value = block.slot[first + source];
    block_on(State::AtWaveBarrier);  // nobody overwrites a slot before every lane has read
    return value;
}

std::map<std::string, Kernel>& registry() {
    static std::map<std::string, Kernel> kernels;
    return kernels;
}
void register_kernel(const std::string& name, Kernel kernel) { registry()[name] = kernel; }
const Kernel* find_kernel(const std::string& name) {
    auto it = registry().find(name);
    return it == registry().end() ? nullptr : &it->second;
}

thread_local const Kernel* running_kernel = nullptr;
thread_local const Arguments* running_args = nullptr;

// Where a fresh fiber starts (entered by emu_switch_stack's `ret`); it never returns: once the
// kernel returns, the fiber is done and switches back to the scheduler for good.
[[noreturn]] void fiber_entry() {
    running_kernel->run(*running_args);
    block_on(State::Done);
    fault("a finished thread was resumed");
}

// A stack that emu_switch_stack enters at fiber_entry: six zero registers to pop, fiber_entry as
// the return address, and above it a dummy return address of fiber_entry's own, so that its
// frame starts 8 bytes off 16-byte alignment as after a call (the x86-64 ABI).
void* fresh_stack(char* stack) {
    auto top = reinterpret_cast<std::uintptr_t>(stack + FIBER_STACK) & ~std::uintptr_t(15);
    auto* words = reinterpret_cast<void**>(top);
    words[-1] = nullptr;
    words[-2] = reinterpret_cast<void*>(&fiber_entry);
    for (int r = 3; r <= 8; ++r) words[-r] = nullptr;
    return &words[-8];
}

// Releases the threads waiting at a barrier that every live thread concerned has reached:
// the block's, or a wave's. False when none could be released.
bool release_barriers(Block& block) {
    bool released = false;
    bool all_at_block = true, any_at_block = false;
    for (auto& f : block.fibers) {
        if (f.state == State::Done) continue;
        all_at_block &= f.state == State::AtBlockBarrier;
        any_at_block |= f.state == State::AtBlockBarrier;
    }
    if (all_at_block && any_at_block) {
        for (auto& f : block.fibers)
            if (f.state == State::AtBlockBarrier) f.state = State::Runnable;
        return true;
    }
    for (int first = 0; first < int(block.fibers.size()); first += WAVE) {
        const int last = std::min<int>(first + WAVE, int(block.fibers.size()));
        bool all_at_wave = true, any_at_wave = false;
        for (int i = first; i < last; ++i) {
            const State st = block.fibers[i].state;
            if (st == State::Done) continue;
            all_at_wave &= st == State::AtWaveBarrier;
            any_at_wave |= st == State::AtWaveBarrier;
        }
        if (all_at_wave && any_at_wave) {
            for (int i = first; i < last; ++i)
                if (block.fibers[i].state == State::AtWaveBarrier) block.fibers[i].state = State::Runnable;
            released = true;
        }
    }
    return released;
}

void run_block(Block& block) {
    for (;;) {
        bool ran = false, live = false;
        for (auto& f : block.fibers) {
            if (f.state == State::Done) continue;
            live = true;
            if (f.state != State::Runnable) continue;
            current_fiber = &f;
            thread_idx = {f.linear % block_dim.x, f.linear / block_dim.x % block_dim.y,
                          f.linear / (block_dim.x * block_dim.y)};
            emu_switch_stack(&block.scheduler_sp, f.sp);
            ran = true;
        }
        if (!live) return;
        if (!release_barriers(block) && !ran)
            fault("threads of a block wait at different barriers (__syncthreads and a wave shuffle)");
    }
}

// The fibers' stacks, kept for the next launch (allocating them per launch cost page faults).
thread_local std::vector<std::unique_ptr<char[]>> stacks;

// Runs every block of the grid in turn.
void run_grid(const Kernel& kernel, const Arguments& args, dim3 grid, dim3 block_shape, std::size_t shared_bytes) {
    dynamic_shared_memory.resize(shared_bytes);
    const int threads = int(block_shape.x * block_shape.y * block_shape.z);
    while (int(stacks.size()) < threads) stacks.emplace_back(new char[FIBER_STACK]);
    Block block;
    block.fibers.resize(threads);
    for (int i = 0; i < threads; ++i) {
        block.fibers[i].linear = i;
        block.fibers[i].stack = stacks[i].get();
    }
    running_kernel = &kernel;
    running_args = &args;
    current_block = &block;
    block_dim = block_shape;
    grid_dim = grid;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                block_idx = {bx, by, bz};
                for (auto& f : block.fibers) {
                    f.state = State::Runnable;
                    f.sp = fresh_stack(f.stack);
                }
                if (shared_bytes) dynamic_shared_memory.poison();
                run_block(block);
            }
    current_block = nullptr;
}

// The kernel names an AMD GPU code object defines: its `NAME.kd` kernel descriptors. Empty when
// the image is not an AMD GPU ELF.
std::set<std::string> code_object_kernels(const void* image) {
    const auto* bytes = static_cast<const unsigned char*>(image);
    const auto* header = static_cast<const Elf64_Ehdr*>(image);
    std::set<std::string> names;
    if (std::memcmp(header->e_ident, ELFMAG, SELFMAG) != 0 || header->e_ident[EI_CLASS] != ELFCLASS64 ||
        header->e_machine != EM_AMDGPU)
        return names;
    const auto* sections = reinterpret_cast<const Elf64_Shdr*>(bytes + header->e_shoff);
    for (int s = 0; s < header->e_shnum; ++s) {
        if (sections[s].sh_type != SHT_SYMTAB) continue;
        const auto* symbols = reinterpret_cast<const Elf64_Sym*>(bytes + sections[s].sh_offset);
        const char* strings = reinterpret_cast<const char*>(bytes + sections[sections[s].sh_link].sh_offset);
        for (size_t i = 0; i < sections[s].sh_size / sizeof(Elf64_Sym); ++i) {
            std::string name = strings + symbols[i].st_name;
            if (name.size() > 3 && name.compare(name.size() - 3, 3, ".kd") == 0)
                names.insert(name.substr(0, name.size() - 3));
        }
    }
    return names;
}

std::mutex allocations_mutex;
std::set<void*> allocations;

}  // namespace emu

struct ihipModule_t {
    std::set<std::string> kernels;
};
struct ihipModuleSymbol_t {
    std::string name;
    const emu::Kernel* kernel;
};
struct ihipEvent_t {
    std::chrono::steady_clock::time_point at;
    bool recorded = false;
};

namespace {
// Functions live as long as the process (the real runtime frees them with their module).
std::mutex functions_mutex;
std::vector<std::unique_ptr<ihipModuleSymbol_t>> functions;
}  // namespace

extern "C" {

hipError_t hipGetDeviceCount(int* count) {
    *count = 1;
    return hipSuccess;
}

hipError_t hipSetDevice(int device) { return device == 0 ? hipSuccess : hipErrorInvalidDevice; }

hipError_t hipDeviceGetAttribute(int* value, hipDeviceAttribute_t attribute, int device) {
    if (device != 0) return hipErrorInvalidDevice;
    switch (attribute) {
        case hipDeviceAttributeWarpSize: *value = emu::WAVE; return hipSuccess;
        case hipDeviceAttributeMultiprocessorCount: *value = emu::COMPUTE_UNITS; return hipSuccess;
        case hipDeviceAttributeMaxThreadsPerBlock: *value = emu::MAX_THREADS_PER_BLOCK; return hipSuccess;
        default: return hipErrorNotSupported;
    }
}

hipError_t hipDeviceGetName(char* name, int len, hipDevice_t device) {
    if (device != 0) return hipErrorInvalidDevice;
    std::snprintf(name, len, "%s", emu::DEVICE_NAME);
    return hipSuccess;
}

hipError_t hipGetDeviceProperties(hipDeviceProp_t* props, int device) {
    if (device != 0) return hipErrorInvalidDevice;
    std::memset(props, 0, sizeof(*props));
    (void)hipDeviceGetName(props->name, sizeof(props->name), device);
    std::snprintf(props->gcnArchName, sizeof(props->gcnArchName), "gfx942:sramecc+:xnack-");
    props->warpSize = emu::WAVE;
    props->multiProcessorCount = emu::COMPUTE_UNITS;
    props->maxThreadsPerBlock = emu::MAX_THREADS_PER_BLOCK;
    return hipSuccess;
}

hipError_t hipMalloc(void** ptr, size_t bytes) {
    const size_t rounded = (bytes + 255) / 256 * 256;
    *ptr = std::aligned_alloc(256, rounded ? rounded : 256);
    if (!*ptr) return hipErrorOutOfMemory;
    std::memset(*ptr, 0xff, rounded);
    std::lock_guard<std::mutex> lock(emu::allocations_mutex);
    emu::allocations.insert(*ptr);
    return hipSuccess;
}

hipError_t hipFree(void* ptr) {
    if (!ptr) return hipSuccess;
    std::lock_guard<std::mutex> lock(emu::allocations_mutex);
    if (!emu::allocations.erase(ptr)) return hipErrorInvalidValue;
    std::free(ptr);
    return hipSuccess;
}

hipError_t hipMemcpy(void* dst, const void* src, size_t bytes, hipMemcpyKind) {
    std::memmove(dst, src, bytes);
    return hipSuccess;
}

hipError_t hipMemcpyAsync(void* dst, const void* src, size_t bytes, hipMemcpyKind kind, hipStream_t) {
    return hipMemcpy(dst, src, bytes, kind);
}

hipError_t hipMemcpy2DAsync(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width,
                            size_t height, hipMemcpyKind, hipStream_t) {
    if (width > dst_pitch || width > src_pitch) return hipErrorInvalidValue;
    for (size_t row = 0; row < height; ++row)
        std::memmove(static_cast<char*>(dst) + row * dst_pitch, static_cast<const char*>(src) + row * src_pitch, width);
    return hipSuccess;
}

hipError_t hipMemsetAsync(void* dst, int value, size_t bytes, hipStream_t) {
    std::memset(dst, value, bytes);
    return hipSuccess;
}

hipError_t hipMemsetD16Async(hipDeviceptr_t dst, unsigned short value, size_t count, hipStream_t) {
    auto* p = static_cast<unsigned short*>(dst);
    for (size_t i = 0; i < count; ++i) p[i] = value;
    return hipSuccess;
}

hipError_t hipMemsetD32Async(hipDeviceptr_t dst, int value, size_t count, hipStream_t) {
    auto* p = static_cast<int*>(dst);
    for (size_t i = 0; i < count; ++i) p[i] = value;
    return hipSuccess;
}

hipError_t hipModuleLoadData(hipModule_t* module, const void* image) {
    auto kernels = emu::code_object_kernels(image);
    if (kernels.empty()) return hipErrorInvalidImage;
    *module = new ihipModule_t{std::move(kernels)};
    return hipSuccess;
}

hipError_t hipModuleUnload(hipModule_t module) {
    delete module;
    return hipSuccess;
}

hipError_t hipModuleGetFunction(hipFunction_t* function, hipModule_t module, const char* name) {
    if (!module->kernels.count(name)) return hipErrorNotFound;
    const emu::Kernel* kernel = emu::find_kernel(name);
    if (!kernel) {
        std::fprintf(stderr, "hip-emulator: %s is in the code object but was not compiled for the CPU\n", name);
        return hipErrorNotFound;
    }
    std::lock_guard<std::mutex> lock(functions_mutex);
    functions.push_back(std::make_unique<ihipModuleSymbol_t>(ihipModuleSymbol_t{name, kernel}));
    *function = functions.back().get();
    return hipSuccess;
}

hipError_t hipModuleLaunchKernel(hipFunction_t f, unsigned int grid_x, unsigned int grid_y, unsigned int grid_z,
                                 unsigned int block_x, unsigned int block_y, unsigned int block_z,
                                 unsigned int shared_bytes, hipStream_t, void** kernel_params, void** extra) {
    if (kernel_params || !extra) {
        std::fprintf(stderr, "hip-emulator: launches pass arguments in `extra`\n");
        return hipErrorNotSupported;
    }
    if (shared_bytes > emu::MAX_DYNAMIC_SHARED) {
        std::fprintf(stderr, "hip-emulator: %s asks for %u bytes of dynamic shared memory, more than the %zu a block has\n",
                     f->name.c_str(), shared_bytes, emu::MAX_DYNAMIC_SHARED);
        return hipErrorInvalidValue;
    }
    emu::Arguments args{nullptr, 0};
    bool has_size = false;
    for (int i = 0; extra[i] != HIP_LAUNCH_PARAM_END; i += 2) {
        if (extra[i] == HIP_LAUNCH_PARAM_BUFFER_POINTER) {
            args.bytes = static_cast<const unsigned char*>(extra[i + 1]);
        } else if (extra[i] == HIP_LAUNCH_PARAM_BUFFER_SIZE) {
            args.size = *static_cast<size_t*>(extra[i + 1]);
            has_size = true;
        } else {
            return hipErrorInvalidValue;
        }
    }
    if (!args.bytes || !has_size) return hipErrorInvalidValue;
    if (args.size != f->kernel->arg_bytes) {
        std::fprintf(stderr, "hip-emulator: %s takes %zu bytes of arguments, the launch passed %zu\n",
                     f->name.c_str(), f->kernel->arg_bytes, args.size);
        return hipErrorInvalidValue;
    }
    const unsigned long long threads = 1ull * block_x * block_y * block_z;
    if (!grid_x || !grid_y || !grid_z || !threads || threads > emu::MAX_THREADS_PER_BLOCK)
        return hipErrorInvalidConfiguration;
    emu::run_grid(*f->kernel, args, {grid_x, grid_y, grid_z}, {block_x, block_y, block_z}, shared_bytes);
    return hipSuccess;
}

hipError_t hipDeviceSynchronize() { return hipSuccess; }

hipError_t hipEventCreate(hipEvent_t* event) {
    *event = new ihipEvent_t;
    return hipSuccess;
}

hipError_t hipEventDestroy(hipEvent_t event) {
    delete event;
    return hipSuccess;
}

hipError_t hipEventRecord(hipEvent_t event, hipStream_t) {
    event->at = std::chrono::steady_clock::now();
    event->recorded = true;
    return hipSuccess;
}

hipError_t hipEventSynchronize(hipEvent_t event) { return event->recorded ? hipSuccess : hipErrorInvalidHandle; }

hipError_t hipEventElapsedTime(float* ms, hipEvent_t start, hipEvent_t stop) {
    if (!start->recorded || !stop->recorded) return hipErrorInvalidHandle;
    *ms = std::chrono::duration<float, std::milli>(stop->at - start->at).count();
    return hipSuccess;
}

const char* hipGetErrorName(hipError_t error) {
    switch (error) {
        case hipSuccess: return "hipSuccess";
        case hipErrorInvalidValue: return "hipErrorInvalidValue";
        case hipErrorOutOfMemory: return "hipErrorOutOfMemory";
        case hipErrorInvalidDevice: return "hipErrorInvalidDevice";
        case hipErrorInvalidImage: return "hipErrorInvalidImage";
        case hipErrorInvalidHandle: return "hipErrorInvalidHandle";
        case hipErrorNotFound: return "hipErrorNotFound";
        case hipErrorInvalidConfiguration: return "hipErrorInvalidConfiguration";
        case hipErrorNotSupported: return "hipErrorNotSupported";
        default: return "hipErrorUnknown";
    }
}

const char* hipGetErrorString(hipError_t error) { return hipGetErrorName(error); }

}  // extern "C"
