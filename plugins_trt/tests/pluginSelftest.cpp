/*
 * libstructkv_plugin_selftest.so: the StructKVCompact plugin's own enqueue, callable from Python
 * (ctypes) on device buffers, without TensorRT's library.
 *
 * Why: the plugin's device path (argument order of each kernel, grid sizes, workspace layout, the
 * cubins of the target architecture, the driver-API launcher) must be checked on a GPU against
 * the torch selection, and a GPU machine does not always have TensorRT. The plugin links no
 * libnvinfer, so this library creates it through its creator and calls enqueue directly, as
 * TensorRT's runtime would after shape inference. scripts/gpu_check.py (check plugin-enqueue)
 * passes torch CUDA tensors and compares the outputs exactly with structkv.selection.
 */
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "NvInferRuntime.h"
#include "structKVCompactPlugin.h"

using namespace nvinfer1;

namespace
{

bool parseType(char const* name, DataType& out)
{
    struct Entry
    {
        char const* name;
        DataType type;
    };
    static Entry const kTypes[] = {{"float32", DataType::kFLOAT}, {"float16", DataType::kHALF},
        {"bfloat16", DataType::kBF16}, {"int64", DataType::kINT64}, {"int32", DataType::kINT32}};
    for (auto const& e : kTypes)
    {
        if (std::strcmp(name, e.name) == 0)
        {
            out = e.type;
            return true;
        }
    }
    return false;
}

//! The plugin for these attributes (runtime phase), or null with a message on stderr.
std::unique_ptr<structkv::StructKVCompactPlugin> makePlugin(char const* mode, int32_t ratioNum, int32_t ratioDen,
    int32_t window, int32_t pooling, char const* poolMode, int32_t chunk)
{
    std::vector<PluginField> fields{
        {"mode", mode, PluginFieldType::kCHAR, static_cast<int32_t>(std::strlen(mode) + 1)},
        {"ratio_num", &ratioNum, PluginFieldType::kINT32, 1},
        {"ratio_den", &ratioDen, PluginFieldType::kINT32, 1},
        {"window", &window, PluginFieldType::kINT32, 1},
        {"pooling", &pooling, PluginFieldType::kINT32, 1},
        {"pool_mode", poolMode, PluginFieldType::kCHAR, static_cast<int32_t>(std::strlen(poolMode) + 1)},
        {"chunk", &chunk, PluginFieldType::kINT32, 1},
    };
    PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
    structkv::StructKVCompactPluginCreator creator;
    IPluginV3* plugin = creator.createPlugin("selftest", &fc, TensorRTPhase::kRUNTIME);
    return std::unique_ptr<structkv::StructKVCompactPlugin>(static_cast<structkv::StructKVCompactPlugin*>(plugin));
}

//! Input descriptors from flat arrays: nbDims[i] dims of input i at dims[8 * i].
bool describe(int32_t nbInputs, int32_t const* nbDims, int64_t const* dims, char const* const* types,
    std::vector<PluginTensorDesc>& desc, std::vector<DynamicPluginTensorDesc>& dynamic)
{
    desc.assign(static_cast<size_t>(nbInputs), PluginTensorDesc{});
    dynamic.assign(static_cast<size_t>(nbInputs), DynamicPluginTensorDesc{});
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        if (nbDims[i] < 1 || nbDims[i] > 8 || !parseType(types[i], desc[i].type))
        {
            std::fprintf(stderr, "selftest: input %d: bad rank %d or type %s\n", i, nbDims[i], types[i]);
            return false;
        }
        desc[i].dims.nbDims = nbDims[i];
        for (int32_t d = 0; d < nbDims[i]; ++d)
        {
            desc[i].dims.d[d] = dims[8 * i + d];
        }
        desc[i].format = TensorFormat::kLINEAR;
        dynamic[i].desc = desc[i];
        dynamic[i].min = desc[i].dims;
        dynamic[i].opt = desc[i].dims;
        dynamic[i].max = desc[i].dims;
    }
    return true;
}

//! The plugin for these attributes with its input descriptors, or false (message on stderr).
struct Prepared
{
    std::unique_ptr<structkv::StructKVCompactPlugin> plugin;
    std::vector<PluginTensorDesc> desc;
    std::vector<DynamicPluginTensorDesc> dynamic;
};

bool prepare(char const* mode, int32_t ratioNum, int32_t ratioDen, int32_t window, int32_t pooling,
    char const* poolMode, int32_t chunk, int32_t nbInputs, int32_t const* nbDims, int64_t const* dims, char const* const* types,
    Prepared& out)
{
    out.plugin = makePlugin(mode, ratioNum, ratioDen, window, pooling, poolMode, chunk);
    return out.plugin && nbInputs == out.plugin->getNbInputs()
        && describe(nbInputs, nbDims, dims, types, out.desc, out.dynamic);
}

} // namespace

extern "C"
{
    //! Workspace bytes the plugin asks for with these inputs, or -1 when it cannot be created.
    __attribute__((visibility("default"))) int64_t structkv_selftest_workspace(char const* mode, int32_t ratioNum,
        int32_t ratioDen, int32_t window, int32_t pooling, char const* poolMode, int32_t chunk, int32_t nbInputs,
        int32_t const* nbDims, int64_t const* dims, char const* const* types)
    {
        Prepared p;
        if (!prepare(mode, ratioNum, ratioDen, window, pooling, poolMode, chunk, nbInputs, nbDims, dims, types, p))
        {
            return -1;
        }
        return static_cast<int64_t>(p.plugin->getWorkspaceSize(p.dynamic.data(), nbInputs, nullptr, 0));
    }

    //! enqueue on ``stream`` (a CUstream / cudaStream_t; 0 = the legacy default stream) with device
    //! pointers; returns the plugin's status (0 on success; errors go to stderr).
    __attribute__((visibility("default"))) int32_t structkv_selftest_enqueue(char const* mode, int32_t ratioNum,
        int32_t ratioDen, int32_t window, int32_t pooling, char const* poolMode, int32_t chunk, int32_t nbInputs,
        int32_t const* nbDims, int64_t const* dims, char const* const* types, void const* const* inputs,
        void* const* outputs, void* workspace, void* stream)
    {
        Prepared p;
        if (!prepare(mode, ratioNum, ratioDen, window, pooling, poolMode, chunk, nbInputs, nbDims, dims, types, p))
        {
            return -1;
        }
        std::vector<PluginTensorDesc> outDesc(static_cast<size_t>(p.plugin->getNbOutputs()));
        return p.plugin->enqueue(
            p.desc.data(), outDesc.data(), inputs, outputs, workspace, static_cast<cudaStream_t>(stream));
    }
}
