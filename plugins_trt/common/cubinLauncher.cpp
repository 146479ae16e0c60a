#include "cubinLauncher.h"

#include <dlfcn.h>

#include <array>
#include <map>
#include <mutex>
#include <utility>

#include "structkv_cubins.h"

namespace structkv
{
namespace
{

struct Driver
{
    CUresult (*ctxGetDevice)(CUdevice*){};
    CUresult (*deviceGetAttribute)(int*, CUdevice_attribute, CUdevice){};
    CUresult (*moduleLoadData)(CUmodule*, void const*){};
    CUresult (*moduleGetFunction)(CUfunction*, CUmodule, char const*){};
    CUresult (*launchKernel)(
        CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream, void**, void**){};
    CUresult (*getErrorString)(CUresult, char const**){};
    std::string error;
};

template <typename F>
bool resolve(void* lib, char const* name, F& fn)
{
    fn = reinterpret_cast<F>(dlsym(lib, name));
    return fn != nullptr;
}

Driver const& driver()
{
    static Driver const d = [] {
        Driver out;
        void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
        if (lib == nullptr)
        {
            out.error = "cannot open libcuda.so.1 (no NVIDIA driver?)";
            return out;
        }
        bool ok = resolve(lib, "cuCtxGetDevice", out.ctxGetDevice)
            && resolve(lib, "cuDeviceGetAttribute", out.deviceGetAttribute)
            && resolve(lib, "cuModuleLoadData", out.moduleLoadData)
            && resolve(lib, "cuModuleGetFunction", out.moduleGetFunction)
            && resolve(lib, "cuLaunchKernel", out.launchKernel) && resolve(lib, "cuGetErrorString", out.getErrorString);
        if (!ok)
        {
            out.error = "libcuda.so.1 lacks a driver API entry point the plugin needs";
        }
        return out;
    }();
    return d;
}

std::string describe(Driver const& d, CUresult code, char const* what)
{
    char const* text = nullptr;
    if (d.getErrorString != nullptr)
    {
        d.getErrorString(code, &text);
    }
    return std::string(what) + " failed: " + (text != nullptr ? text : std::to_string(static_cast<int>(code)));
}

} // namespace

int cubinArchFor(int major, int minor) noexcept
{
    (void) minor;
    if (major == 8)
    {
        return 80; // sm_80 SASS runs on sm_86 / sm_89
    }
    if (major == 9)
    {
        return 90;
    }
    return -1;
}

std::string launchKernel(KernelId id, unsigned gridX, unsigned gridY, unsigned gridZ, void** args, int numArgs,
    CUstream stream) noexcept
{
    try
    {
        Driver const& d = driver();
        if (!d.error.empty())
        {
            return d.error;
        }
        if (id < 0 || id >= cubins::kNumVariants)
        {
            return "unknown kernel id " + std::to_string(id);
        }
        CUdevice device{};
        CUresult rc = d.ctxGetDevice(&device);
        if (rc != CUDA_SUCCESS)
        {
            return describe(d, rc, "cuCtxGetDevice");
        }
        static std::mutex mutex;
        static std::map<std::pair<int, int>, std::pair<CUfunction, cubins::Cubin const*>> cache;
        std::pair<CUfunction, cubins::Cubin const*> entry{};
        {
            std::lock_guard<std::mutex> lock(mutex);
            auto found = cache.find({static_cast<int>(device), id});
            if (found != cache.end())
            {
                entry = found->second;
            }
            else
            {
                int major = 0;
                int minor = 0;
                d.deviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device);
                d.deviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device);
                int const arch = cubinArchFor(major, minor);
                cubins::Cubin const* cubin = nullptr;
                for (int a = 0; a < cubins::kNumArchs; ++a)
                {
                    cubins::Cubin const& c = cubins::kCubins[id * cubins::kNumArchs + a];
                    if (c.arch == arch)
                    {
                        cubin = &c;
                    }
                }
                if (cubin == nullptr)
                {
                    return "no StructKV cubin for compute capability " + std::to_string(major) + "."
                        + std::to_string(minor) + " (built for sm_80 and sm_90)";
                }
                CUmodule module{};
                rc = d.moduleLoadData(&module, cubin->data);
                if (rc != CUDA_SUCCESS)
                {
                    return describe(d, rc, "cuModuleLoadData");
                }
                CUfunction fn{};
                rc = d.moduleGetFunction(&fn, module, cubin->entry);
                if (rc != CUDA_SUCCESS)
                {
                    return describe(d, rc, "cuModuleGetFunction");
                }
                entry = {fn, cubin};
                cache[{static_cast<int>(device), id}] = entry;
            }
        }
        if (numArgs != entry.second->numArgs)
        {
            return "kernel " + std::string(entry.second->entry) + " takes " + std::to_string(entry.second->numArgs)
                + " arguments, got " + std::to_string(numArgs);
        }
        if (gridX == 0 || gridY == 0 || gridZ == 0)
        {
            return {}; // nothing to do (an empty selection)
        }
        // Triton kernels take two trailing scratch pointers (global, profile); ours need neither.
        CUdeviceptr globalScratch = 0;
        CUdeviceptr profileScratch = 0;
        std::array<void*, 32> all{};
        for (int i = 0; i < numArgs; ++i)
        {
            all[i] = args[i];
        }
        all[numArgs] = &globalScratch;
        all[numArgs + 1] = &profileScratch;
        rc = d.launchKernel(entry.first, gridX, gridY, gridZ, 32 * entry.second->numWarps, 1, 1,
            entry.second->sharedBytes, stream, all.data(), nullptr);
        if (rc != CUDA_SUCCESS)
        {
            return describe(d, rc, "cuLaunchKernel");
        }
        return {};
    }
    catch (std::exception const& e)
    {
        return e.what();
    }
}

} // namespace structkv
