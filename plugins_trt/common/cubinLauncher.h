/*
 * Launch the ahead-of-time compiled Triton kernels (structkv_cubins.h) through the CUDA driver
 * API on a given stream.
 *
 * The driver library is opened with dlopen on first use, not linked: the plugin library then
 * loads (and its host side is unit-tested) on machines without a GPU driver, and TensorRT's
 * process has libcuda loaded anyway. Modules are loaded once per device and kernel (a
 * process-wide cache), choosing the cubin built for the device's compute capability (sm_80
 * cubins also serve sm_86/sm_89; sm_90 serves sm_90).
 */
#pragma once

#include <cstdint>
#include <string>

#include <cuda.h>

namespace structkv
{

//! Index of a kernel variant in structkv::cubins::kCubins (by variant, not architecture).
using KernelId = int;

//! Launch kernel ``id`` with ``args`` (pointers to each argument's value, in the kernel's order,
//! without the two trailing scratch pointers, which are appended as null). Returns an error
//! message, empty on success.
std::string launchKernel(KernelId id, unsigned gridX, unsigned gridY, unsigned gridZ, void** args,
    int numArgs, CUstream stream) noexcept;

//! The sm version the cubin for a device of compute capability major.minor would be, or -1.
int cubinArchFor(int major, int minor) noexcept;

} // namespace structkv
