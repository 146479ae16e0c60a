/*
 * StructKVCompact: StructKV's top-k selection, gather and compaction as one TensorRT IPluginV3
 * (name "StructKVCompact", namespace "structkv", version "1"). See README.md for its inputs,
 * outputs and attributes.
 *
 * Why a plugin: TensorRT's TopK layer supports K <= 3840, and StructKV keeps ceil(R * N) + w
 * tokens (past 3840 from N ~ 19K at R = 0.2). Output shapes follow from N alone (IExprBuilder),
 * never from data. The kernels are the OpenAI Triton kernels of
 * structkv/kernels/select_triton.py, compiled ahead of time to cubins and launched on
 * TensorRT's stream (common/cubinLauncher.h).
 */
#pragma once

#include <string>
#include <vector>

#include "NvInferRuntime.h"
#include "structKVSelection.h"

namespace structkv
{

//! compact: hidden [1, N, E], centrality [N] -> hidden [1, K, E], positions [K] (int64).
//! kv_select: keys, values [l, G, n, D], saliency [l, G, n], positions [n] (int64), prompt_len
//! [N] (only its length) -> keys, values [l, G, K, D], positions [l, G, K] (int64).
enum class SelectionMode : int32_t
{
    kCOMPACT = 0,
    kKV_SELECT = 1
};

//! The plugin's attributes, parsed and checked once (creator) and serialised as fields.
struct CompactParams
{
    SelectionMode mode{SelectionMode::kCOMPACT};
    Ratio ratio{1, 5};
    int32_t window{8};
    int32_t pooling{7};
    bool avgPool{false};
    int32_t chunk{0}; //!< 0 or 1: single tokens; > 1: whole chunks of this many tokens

    //! Parse a field collection; unknown fields and bad values throw std::invalid_argument
    //! with one message naming the field and what is accepted.
    static CompactParams fromFields(nvinfer1::PluginFieldCollection const* fc);
};

char const* modeName(SelectionMode mode) noexcept;

//! The plugin's identity, written once: IPluginV3OneCore and IPluginCreatorV3One both declare
//! these three getters, and the plugin and its creator must answer them identically.
inline constexpr char const* kPLUGIN_NAME = "StructKVCompact";
inline constexpr char const* kPLUGIN_VERSION = "1";
inline constexpr char const* kPLUGIN_NAMESPACE = "structkv";

template <typename Interface>
class WithStructKVIdentity : public Interface
{
public:
    char const* getPluginName() const noexcept override
    {
        return kPLUGIN_NAME;
    }
    char const* getPluginVersion() const noexcept override
    {
        return kPLUGIN_VERSION;
    }
    char const* getPluginNamespace() const noexcept override
    {
        return kPLUGIN_NAMESPACE;
    }
};

class StructKVCompactPlugin : public nvinfer1::IPluginV3,
                              public WithStructKVIdentity<nvinfer1::IPluginV3OneCore>,
                              public nvinfer1::IPluginV3OneBuild,
                              public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit StructKVCompactPlugin(CompactParams params);
    ~StructKVCompactPlugin() override = default;

    CompactParams const& params() const noexcept
    {
        return mParams;
    }

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore: WithStructKVIdentity

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

    int32_t getNbInputs() const noexcept;

private:
    CompactParams mParams;
    // getFieldsToSerialize() hands out pointers into these.
    std::string mModeText;
    std::string mPoolText;
    int32_t mRatioFields[2]{};
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

class StructKVCompactPluginCreator : public WithStructKVIdentity<nvinfer1::IPluginCreatorV3One>
{
public:
    StructKVCompactPluginCreator();
    ~StructKVCompactPluginCreator() override = default;

    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

//! Log through the logger TensorRT handed to setLoggerFinder (stderr before that).
void logError(std::string const& message) noexcept;

} // namespace structkv
