// An emulated AMD GPU: the part of the HIP runtime API that src/hip/runtime.rs calls, implemented
// on the CPU, linked with the kernels compiled as C++ (kernels/emulator/device.h) into one
// libamdhip64.so.5 (scripts/build-hip-emulator.sh). Put its folder on LD_LIBRARY_PATH and the
// unchanged HIP binary (`mhc-train-hip selftest --device hip`) runs its kernels here.
//
// What it checks that the hardware would not report as clearly: each code object handed to
// hipModuleLoadData must be an AMD GPU ELF, and a kernel is found only in the module whose code
// object lists it (as on the GPU); the launch's argument buffer must have exactly the size the
// kernel's parameter list packs to; fresh allocations hold NaN bytes (0xff), so reading memory
// nothing wrote shows. One device, gfx942, 64-lane waves, 4 compute units (small grids keep the
// emulation fast; the launch rules read the count). Work runs at once on the calling thread:
// streams, events and synchronisation are trivially in order.
#include <hip/hip_runtime_api.h>

#include <elf.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "threads.h"
#include "launch.h"

namespace emu {

constexpr int COMPUTE_UNITS = 4;
constexpr int MAX_THREADS_PER_BLOCK = 1024;
// A barrier that waits longer than this means the block's threads took different paths.
constexpr auto BARRIER_TIMEOUT = std::chrono::seconds(120);

[[noreturn]] void fault(const std::string& what) {
    std::fprintf(stderr, "hip-emulator: kernel fault: %s\n", what.c_str());
    std::fflush(stderr);
    std::abort();
}

// A counting barrier whose participants can leave (threads that return from the kernel).
class Barrier {
  public:
    explicit Barrier(int participants) : expected_(participants) {}
    void arrive_and_wait(const char* what) {
        std::unique_lock<std::mutex> lock(mutex_);
        const unsigned long long phase = phase_;
        if (++arrived_ == expected_) {
            release();
            return;
        }
        if (!released_.wait_for(lock, BARRIER_TIMEOUT, [&] { return phase_ != phase; }))
            fault(std::string(what) + " never completed: threads of a block diverged around it");
    }
    void leave() {
        std::lock_guard<std::mutex> lock(mutex_);
        --expected_;
        if (arrived_ > 0 && arrived_ == expected_) release();
    }

  private:
    void release() {
        arrived_ = 0;
        ++phase_;
        released_.notify_all();
    }
    std::mutex mutex_;
    std::condition_variable released_;
    int expected_, arrived_ = 0;
    unsigned long long phase_ = 0;
};

struct Wave {
    explicit Wave(int lanes) : lanes(lanes), barrier(lanes), alive(lanes, 1) {}
    int lanes;
    Barrier barrier;
    float slot[WAVE] = {};
    std::vector<char> alive;
};

struct Block {
    explicit Block(int threads) : barrier(threads) {
        for (int first = 0; first < threads; first += WAVE)
            waves.push_back(std::make_unique<Wave>(std::min(WAVE, threads - first)));
    }
    Barrier barrier;
    std::vector<std::unique_ptr<Wave>> waves;
};

thread_local dim3 thread_idx, block_idx, block_dim, grid_dim;
thread_local Block* current_block = nullptr;
thread_local int current_lane = 0, current_wave = 0;

void sync_block() { current_block->barrier.arrive_and_wait("__syncthreads"); }

float shuffle_xor(float v, int lane_mask) {
    Wave& wave = *current_block->waves[current_wave];
    const int source = current_lane ^ lane_mask;
    if (source < 0 || source >= wave.lanes)
        fault("shuffle from lane " + std::to_string(source) + " of a wave of " + std::to_string(wave.lanes) +
              " lanes");
    wave.slot[current_lane] = v;
    wave.barrier.arrive_and_wait("a wave shuffle");
    // Past the barrier every live lane has written its slot; a lane that returned has not.
    if (!wave.alive[source]) fault("shuffle from lane " + std::to_string(source) + ", which has returned");
    const float value = wave.slot[source];
    wave.barrier.arrive_and_wait("a wave shuffle");
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

// Runs every block of the grid in turn, each block's threads concurrently.
void run_grid(const Kernel& kernel, const Arguments& args, dim3 grid, dim3 block) {
    const int threads = int(block.x * block.y * block.z);
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                Block state(threads);
                std::vector<std::thread> pool;
                pool.reserve(threads);
                for (int linear = 0; linear < threads; ++linear) {
                    pool.emplace_back([&, linear] {
                        thread_idx = {linear % block.x, linear / block.x % block.y, linear / (block.x * block.y)};
                        block_idx = {bx, by, bz};
                        block_dim = block;
                        grid_dim = grid;
                        current_block = &state;
                        current_lane = linear % WAVE;
                        current_wave = linear / WAVE;
                        kernel.run(args);
                        Wave& wave = *state.waves[current_wave];
                        wave.alive[current_lane] = 0;
                        wave.barrier.leave();
                        state.barrier.leave();
                    });
                }
                for (auto& t : pool) t.join();
            }
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
    std::snprintf(name, len, "CPU emulation of a 64-lane AMD GPU (gfx942)");
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
    if (kernel_params || !extra || shared_bytes) {
        std::fprintf(stderr, "hip-emulator: launches pass arguments in `extra` and use no dynamic shared memory\n");
        return hipErrorNotSupported;
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
    emu::run_grid(*f->kernel, args, {grid_x, grid_y, grid_z}, {block_x, block_y, block_z});
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
