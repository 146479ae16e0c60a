#include "structKVCompactPlugin.h"

#include <cstdio>
#include <cstring>
#include <stdexcept>

#include "cubinLauncher.h"
#include "structkv_cubins.h"

using namespace nvinfer1;

namespace structkv
{
namespace
{

std::string fieldText(PluginField const& f)
{
    if (f.type != PluginFieldType::kCHAR || f.data == nullptr)
    {
        throw std::invalid_argument(std::string("attribute ") + f.name + " must be a string");
    }
    auto const* chars = static_cast<char const*>(f.data);
    return std::string(chars, strnlen(chars, static_cast<size_t>(f.length)));
}

//! One number from a field stored as either of two types (ONNX attributes arrive as int32/int64
//! or float32/float64 depending on who wrote the graph).
template <typename Out, typename Narrow, typename Wide>
Out fieldNumber(PluginField const& f, PluginFieldType narrow, PluginFieldType wide, char const* what)
{
    if (f.data == nullptr || f.length != 1 || (f.type != narrow && f.type != wide))
    {
        throw std::invalid_argument(std::string("attribute ") + f.name + " must be one " + what);
    }
    return f.type == narrow ? static_cast<Out>(*static_cast<Narrow const*>(f.data))
                            : static_cast<Out>(*static_cast<Wide const*>(f.data));
}

int64_t fieldInt(PluginField const& f)
{
    return fieldNumber<int64_t, int32_t, int64_t>(
        f, PluginFieldType::kINT32, PluginFieldType::kINT64, "int32 or int64");
}

double fieldFloat(PluginField const& f)
{
    return fieldNumber<double, float, double>(
        f, PluginFieldType::kFLOAT32, PluginFieldType::kFLOAT64, "float32 or float64");
}

bool isFloatType(DataType t)
{
    return t == DataType::kFLOAT || t == DataType::kHALF || t == DataType::kBF16;
}

int gatherKernel(DataType t)
{
    switch (t)
    {
    case DataType::kFLOAT: return cubins::kGatherF32;
    case DataType::kHALF: return cubins::kGatherF16;
    case DataType::kBF16: return cubins::kGatherBf16;
    case DataType::kINT64: return cubins::kGatherI64;
    default: return -1;
    }
}

int64_t volume(Dims const& d, int32_t from, int32_t to)
{
    int64_t v = 1;
    for (int32_t i = from; i < to; ++i)
    {
        v *= d.d[i];
    }
    return v;
}

//! Byte offsets of the workspace's buffers for `rows` rows of `n` scores: int32 keys (of tokens,
//! or of chunks in chunk mode), int64 kept indices (kv_select; compact writes them into its
//! output), and in chunk mode the pooled scores (float32 bits) and int64 chosen chunks. Each buffer starts
//! on a 256-byte boundary.
struct WorkspaceLayout
{
    size_t indices{0};
    size_t pooled{0};
    size_t chosen{0};
    size_t total{0};
};

WorkspaceLayout workspaceLayout(int64_t rows, int64_t n, bool compact, bool chunked)
{
    auto aligned = [](size_t bytes) { return (bytes + 255) / 256 * 256; };
    size_t const cells = static_cast<size_t>(rows * n);
    WorkspaceLayout w;
    size_t at = aligned(cells * sizeof(int32_t));
    w.indices = at;
    if (!compact)
    {
        at += cells * sizeof(int64_t); // K <= n
    }
    if (chunked)
    {
        w.pooled = at = aligned(at);
        at += aligned(cells * sizeof(float));
        w.chosen = at;
        at += cells * sizeof(int64_t); // chunks kept <= n
    }
    w.total = at;
    return w;
}

ILoggerFinder* gLoggerFinder = nullptr;
} // namespace

void logError(std::string const& message) noexcept
{
    std::string const text = std::string("StructKVCompact: ") + message;
    ILogger* logger = gLoggerFinder != nullptr ? gLoggerFinder->findLogger() : nullptr;
    if (logger != nullptr)
    {
        logger->log(ILogger::Severity::kERROR, text.c_str());
    }
    else
    {
        std::fprintf(stderr, "%s\n", text.c_str());
    }
}

char const* modeName(SelectionMode mode) noexcept
{
    return mode == SelectionMode::kCOMPACT ? "compact" : "kv_select";
}

CompactParams CompactParams::fromFields(PluginFieldCollection const* fc)
{
    CompactParams p;
    bool haveNum = false;
    bool haveDen = false;
    bool haveFloat = false;
    double ratio = 0.0;
    int64_t num = 0;
    int64_t den = 0;
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
    {
        PluginField const& f = fc->fields[i];
        std::string const name = f.name != nullptr ? f.name : "";
        if (name == "mode")
        {
            std::string const v = fieldText(f);
            if (v == "compact")
            {
                p.mode = SelectionMode::kCOMPACT;
            }
            else if (v == "kv_select")
            {
                p.mode = SelectionMode::kKV_SELECT;
            }
            else
            {
                throw std::invalid_argument("mode must be \"compact\" or \"kv_select\", got \"" + v + "\"");
            }
        }
        else if (name == "r_struct" || name == "r_kv")
        {
            ratio = fieldFloat(f);
            haveFloat = true;
        }
        else if (name == "ratio_num")
        {
            num = fieldInt(f);
            haveNum = true;
        }
        else if (name == "ratio_den")
        {
            den = fieldInt(f);
            haveDen = true;
        }
        else if (name == "window")
        {
            int64_t const w = fieldInt(f);
            if (w < 1 || w > 65536)
            {
                throw std::invalid_argument("window must be in 1..65536, got " + std::to_string(w));
            }
            p.window = static_cast<int32_t>(w);
        }
        else if (name == "pooling")
        {
            int64_t const k = fieldInt(f);
            if (k < 1 || k > 1023 || (k > 1 && k % 2 == 0))
            {
                throw std::invalid_argument("pooling must be 1 (off) or an odd kernel up to 1023, got "
                    + std::to_string(k));
            }
            p.pooling = static_cast<int32_t>(k);
        }
        else if (name == "pool_mode")
        {
            std::string const v = fieldText(f);
            if (v != "max" && v != "avg")
            {
                throw std::invalid_argument("pool_mode must be \"max\" or \"avg\", got \"" + v + "\"");
            }
            p.avgPool = v == "avg";
        }
        else if (name == "chunk")
        {
            int64_t const c = fieldInt(f);
            if (c < 0 || c > 65536)
            {
                throw std::invalid_argument("chunk must be 0 (single tokens) or a chunk size up to 65536, got "
                    + std::to_string(c));
            }
            p.chunk = static_cast<int32_t>(c);
        }
        else
        {
            throw std::invalid_argument("unknown attribute \"" + name
                + "\" (known: mode, r_struct, r_kv, ratio_num, ratio_den, window, pooling, pool_mode, chunk)");
        }
    }
    if (haveNum != haveDen)
    {
        throw std::invalid_argument("ratio_num and ratio_den go together");
    }
    if (haveNum)
    {
        if (num < 1 || den < num || den > 1000000)
        {
            throw std::invalid_argument("ratio_num / ratio_den must be in (0, 1] with ratio_den <= 1000000, got "
                + std::to_string(num) + "/" + std::to_string(den));
        }
        p.ratio = {num, den};
    }
    else if (haveFloat)
    {
        p.ratio = limitDenominator(ratio);
    }
    return p;
}

// -- plugin ---------------------------------------------------------------------------------------
StructKVCompactPlugin::StructKVCompactPlugin(CompactParams params)
    : mParams(params)
{
}

IPluginCapability* StructKVCompactPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* StructKVCompactPlugin::clone() noexcept
{
    try
    {
        return new StructKVCompactPlugin(mParams);
    }
    catch (std::exception const& e)
    {
        logError(e.what());
        return nullptr;
    }
}

int32_t StructKVCompactPlugin::getNbInputs() const noexcept
{
    return mParams.mode == SelectionMode::kCOMPACT ? 2 : 5;
}

int32_t StructKVCompactPlugin::getNbOutputs() const noexcept
{
    return mParams.mode == SelectionMode::kCOMPACT ? 2 : 3;
}

int32_t StructKVCompactPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    (void) in;
    (void) out;
    if (nbInputs != getNbInputs() || nbOutputs != getNbOutputs())
    {
        logError(std::string(modeName(mParams.mode)) + " takes " + std::to_string(getNbInputs()) + " inputs and "
            + std::to_string(getNbOutputs()) + " outputs");
        return -1;
    }
    return 0;
}

int32_t StructKVCompactPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbInputs != getNbInputs() || nbOutputs != getNbOutputs())
    {
        return -1;
    }
    if (mParams.mode == SelectionMode::kCOMPACT)
    {
        outputTypes[0] = inputTypes[0];
        outputTypes[1] = DataType::kINT64;
    }
    else
    {
        outputTypes[0] = inputTypes[0];
        outputTypes[1] = inputTypes[1];
        outputTypes[2] = DataType::kINT64;
    }
    return 0;
}

int32_t StructKVCompactPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* shapeInputs,
    int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept
{
    (void) shapeInputs;
    (void) nbShapeInputs;
    if (nbInputs != getNbInputs() || nbOutputs != getNbOutputs())
    {
        logError("wrong number of inputs or outputs for mode " + std::string(modeName(mParams.mode)));
        return -1;
    }
    bool const compact = mParams.mode == SelectionMode::kCOMPACT;
    if (compact ? (inputs[0].nbDims != 3 || inputs[1].nbDims != 1)
                : (inputs[0].nbDims != 4 || inputs[1].nbDims != 4 || inputs[2].nbDims != 3 || inputs[3].nbDims != 1
                    || inputs[4].nbDims != 1))
    {
        logError(compact ? "compact expects hidden [1, N, E] and centrality [N]"
                         : "kv_select expects keys/values [l, G, n, D], saliency [l, G, n], positions [n], "
                           "prompt_len [N]");
        return -1;
    }
    // K = min(ceil(num * N / den), n - w) + w, all from input dimensions.
    IDimensionExpr const* n = compact ? inputs[1].d[0] : inputs[2].d[2];
    IDimensionExpr const* promptLen = compact ? inputs[1].d[0] : inputs[4].d[0];
    IDimensionExpr const* w = exprBuilder.constant(mParams.window);
    IDimensionExpr const* scaled = exprBuilder.operation(DimensionOperation::kPROD, *promptLen,
        *exprBuilder.constant(mParams.ratio.num));
    IDimensionExpr const* topk = exprBuilder.operation(DimensionOperation::kCEIL_DIV, *scaled,
        *exprBuilder.constant(mParams.ratio.den));
    IDimensionExpr const* candidates = exprBuilder.operation(DimensionOperation::kSUB, *n, *w);
    IDimensionExpr const* kept = exprBuilder.operation(DimensionOperation::kSUM,
        *exprBuilder.operation(DimensionOperation::kMIN, *topk, *candidates), *w);
    if (mParams.chunk > 1)
    {
        // chunkPlan as expressions: whole = (n - w) / c, rest = n - w - whole c,
        // keep = min(whole, max(1, max(topk - rest, 0) / c)), K = keep c + n - whole c.
        auto op = [&](DimensionOperation o, IDimensionExpr const* a, IDimensionExpr const* b) {
            return exprBuilder.operation(o, *a, *b);
        };
        IDimensionExpr const* c = exprBuilder.constant(mParams.chunk);
        IDimensionExpr const* whole = op(DimensionOperation::kFLOOR_DIV, candidates, c);
        IDimensionExpr const* chunked = op(DimensionOperation::kPROD, whole, c);
        IDimensionExpr const* rest = op(DimensionOperation::kSUB, candidates, chunked);
        IDimensionExpr const* over
            = op(DimensionOperation::kMAX, op(DimensionOperation::kSUB, topk, rest), exprBuilder.constant(0));
        IDimensionExpr const* keep = op(DimensionOperation::kMIN, whole,
            op(DimensionOperation::kMAX, exprBuilder.constant(1), op(DimensionOperation::kFLOOR_DIV, over, c)));
        kept = op(DimensionOperation::kSUM, op(DimensionOperation::kPROD, keep, c),
            op(DimensionOperation::kSUB, n, chunked));
    }
    if (compact)
    {
        outputs[0].nbDims = 3;
        outputs[0].d[0] = inputs[0].d[0];
        outputs[0].d[1] = kept;
        outputs[0].d[2] = inputs[0].d[2];
        outputs[1].nbDims = 1;
        outputs[1].d[0] = kept;
        return 0;
    }
    for (int32_t o = 0; o < 2; ++o)
    {
        outputs[o].nbDims = 4;
        outputs[o].d[0] = inputs[o].d[0];
        outputs[o].d[1] = inputs[o].d[1];
        outputs[o].d[2] = kept;
        outputs[o].d[3] = inputs[o].d[3];
    }
    outputs[2].nbDims = 3;
    outputs[2].d[0] = inputs[2].d[0];
    outputs[2].d[1] = inputs[2].d[1];
    outputs[2].d[2] = kept;
    return 0;
}

bool StructKVCompactPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != getNbInputs() || nbOutputs != getNbOutputs() || pos < 0 || pos >= nbInputs + nbOutputs)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    DataType const t = desc.type;
    DataType const first = inOut[0].desc.type;
    if (mParams.mode == SelectionMode::kCOMPACT)
    {
        switch (pos)
        {
        case 0: return isFloatType(t);             // hidden
        case 1: return t == DataType::kFLOAT;      // centrality
        case 2: return t == first;                 // compacted hidden
        case 3: return t == DataType::kINT64;      // positions
        default: return false;
        }
    }
    switch (pos)
    {
    case 0: return isFloatType(t);                                    // keys
    case 1: return t == first;                                        // values
    case 2: return t == DataType::kFLOAT;                             // saliency
    case 3: return t == DataType::kINT64;                             // positions
    case 4: return t == DataType::kINT64 || t == DataType::kINT32 || t == DataType::kFLOAT; // prompt_len
    case 5: return t == first;                                        // kept keys
    case 6: return t == first;                                        // kept values
    case 7: return t == DataType::kINT64;                             // kept positions
    default: return false;
    }
}

size_t StructKVCompactPlugin::getWorkspaceSize(
    DynamicPluginTensorDesc const* inputs, int32_t nbInputs, DynamicPluginTensorDesc const* outputs,
    int32_t nbOutputs) const noexcept
{
    (void) outputs;
    (void) nbOutputs;
    if (nbInputs != getNbInputs())
    {
        return 0;
    }
    Dims const& scores = mParams.mode == SelectionMode::kCOMPACT ? inputs[1].max : inputs[2].max;
    int64_t const n = scores.d[scores.nbDims - 1];
    int64_t const rows = volume(scores, 0, scores.nbDims - 1);
    return workspaceLayout(rows, n, mParams.mode == SelectionMode::kCOMPACT, mParams.chunk > 1).total;
}

int32_t StructKVCompactPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    (void) in;
    (void) out;
    return nbInputs == getNbInputs() && nbOutputs == getNbOutputs() ? 0 : -1;
}

int32_t StructKVCompactPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    auto const cuStream = reinterpret_cast<CUstream>(stream);
    bool const compact = mParams.mode == SelectionMode::kCOMPACT;
    Dims const& scoreDims = compact ? inputDesc[1].dims : inputDesc[2].dims;
    int32_t n = static_cast<int32_t>(scoreDims.d[scoreDims.nbDims - 1]);
    int32_t window = mParams.window;
    int64_t const rows = volume(scoreDims, 0, scoreDims.nbDims - 1);
    int64_t const promptLen = compact ? n : inputDesc[4].dims.d[0];
    bool const chunked = mParams.chunk > 1;
    int64_t const kept = selectedCount(mParams.ratio, promptLen, n, window, mParams.chunk);
    int32_t m = n - window;
    if (m < 1)
    {
        logError("a row of " + std::to_string(n) + " scores leaves no candidate outside the window of "
            + std::to_string(window));
        return -1;
    }
    WorkspaceLayout const layout = workspaceLayout(rows, n, compact, chunked);
    auto* base = static_cast<char*>(workspace);
    auto* keys = reinterpret_cast<int32_t*>(base);
    auto* indices = compact ? static_cast<int64_t*>(outputs[1]) : reinterpret_cast<int64_t*>(base + layout.indices);
    void const* scores = compact ? inputs[1] : inputs[2];
    int32_t pool = mParams.pooling;
    int32_t avg = mParams.avgPool ? 1 : 0;
    int64_t rowStride = n;
    int64_t keyStride = m;
    std::string error;
    if (chunked)
    {
        // pool_values -> chunk_keys (chunk means, the torch path's arithmetic) -> select_rows over
        // the chunk keys (no window) -> expand_chunks (kept chunks' tokens, remainder, window)
        ChunkPlan const plan = chunkPlan(mParams.ratio, promptLen, n, window, mParams.chunk);
        auto* pooled = reinterpret_cast<int32_t*>(base + layout.pooled); // float32 bits
        auto* chosen = reinterpret_cast<int64_t*>(base + layout.chosen);
        int32_t chunk = mParams.chunk;
        int32_t whole = static_cast<int32_t>(plan.whole);
        int32_t keep = static_cast<int32_t>(plan.keep);
        int32_t noWindow = 0;
        int64_t chunkStride = std::max<int64_t>(plan.keep, 1);
        int64_t wholeStride = plan.whole;
        int64_t outStride = kept;
        if (whole > 0)
        {
            void* args[] = {&scores, &pooled, &n, &window, &pool, &avg, &rowStride, &keyStride};
            error = launchKernel(cubins::kPoolValues, static_cast<unsigned>(rows),
                static_cast<unsigned>((m + 1023) / 1024), 1, args, 8, cuStream);
            if (error.empty())
            {
                void* chunkArgs[] = {&pooled, &keys, &chunk, &whole, &keyStride, &wholeStride};
                error = launchKernel(cubins::kChunkKeys, static_cast<unsigned>(rows), 1, 1, chunkArgs, 6, cuStream);
            }
            if (error.empty())
            {
                void* selectArgs[] = {&keys, &chosen, &whole, &keep, &noWindow, &wholeStride, &chunkStride};
                error = launchKernel(cubins::kSelectRows, static_cast<unsigned>(rows), 1, 1, selectArgs, 7, cuStream);
            }
        }
        if (error.empty())
        {
            void* args[] = {&chosen, &indices, &n, &keep, &chunk, &whole, &chunkStride, &outStride};
            error = launchKernel(cubins::kExpandChunks, static_cast<unsigned>(rows),
                static_cast<unsigned>((kept + 1023) / 1024), 1, args, 8, cuStream);
        }
    }
    else
    {
        int32_t topk = static_cast<int32_t>(kept - window);
        int64_t outStride = kept;
        void* args[] = {&scores, &keys, &n, &window, &pool, &avg, &rowStride, &keyStride};
        error = launchKernel(cubins::kPoolKeys, static_cast<unsigned>(rows), static_cast<unsigned>((m + 1023) / 1024),
            1, args, 8, cuStream);
        if (error.empty())
        {
            void* selectArgs[] = {&keys, &indices, &n, &topk, &window, &keyStride, &outStride};
            error = launchKernel(cubins::kSelectRows, static_cast<unsigned>(rows), 1, 1, selectArgs, 7, cuStream);
        }
    }
    // gather_rows(src, index, dst, count, width, src_group_stride, index_group_stride)
    auto gather = [&](void const* src, void* dst, DataType type, int64_t width, int64_t srcGroupStride) {
        int const id = gatherKernel(type);
        if (id < 0)
        {
            return std::string("unsupported data type for the gather");
        }
        int32_t count = static_cast<int32_t>(kept);
        int32_t w = static_cast<int32_t>(width);
        int64_t indexGroupStride = kept;
        void* args[] = {&src, &indices, &dst, &count, &w, &srcGroupStride, &indexGroupStride};
        unsigned const groups = static_cast<unsigned>(compact ? 1 : rows);
        return launchKernel(id, groups * static_cast<unsigned>(kept), static_cast<unsigned>((width + 255) / 256), 1,
            args, 7, cuStream);
    };
    if (error.empty() && compact)
    {
        int64_t const width = inputDesc[0].dims.d[2];
        error = gather(inputs[0], outputs[0], inputDesc[0].type, width, static_cast<int64_t>(n) * width);
    }
    else if (error.empty())
    {
        int64_t const d = inputDesc[0].dims.d[3];
        error = gather(inputs[0], outputs[0], inputDesc[0].type, d, static_cast<int64_t>(n) * d);
        if (error.empty())
        {
            error = gather(inputs[1], outputs[1], inputDesc[1].type, d, static_cast<int64_t>(n) * d);
        }
        if (error.empty())
        {
            error = gather(inputs[3], outputs[2], DataType::kINT64, 1, 0); // shared positions [n]
        }
    }
    (void) outputDesc;
    if (!error.empty())
    {
        logError(error);
        return -1;
    }
    return 0;
}

IPluginV3* StructKVCompactPlugin::attachToContext(IPluginResourceContext* context) noexcept
{
    (void) context;
    return clone();
}

PluginFieldCollection const* StructKVCompactPlugin::getFieldsToSerialize() noexcept
{
    mModeText = modeName(mParams.mode);
    mPoolText = mParams.avgPool ? "avg" : "max";
    mRatioFields[0] = static_cast<int32_t>(mParams.ratio.num);
    mRatioFields[1] = static_cast<int32_t>(mParams.ratio.den);
    mFields = {
        PluginField("mode", mModeText.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(mModeText.size() + 1)),
        PluginField("ratio_num", &mRatioFields[0], PluginFieldType::kINT32, 1),
        PluginField("ratio_den", &mRatioFields[1], PluginFieldType::kINT32, 1),
        PluginField("window", &mParams.window, PluginFieldType::kINT32, 1),
        PluginField("pooling", &mParams.pooling, PluginFieldType::kINT32, 1),
        PluginField("pool_mode", mPoolText.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(mPoolText.size() + 1)),
        PluginField("chunk", &mParams.chunk, PluginFieldType::kINT32, 1),
    };
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
    return &mFieldCollection;
}

// -- creator --------------------------------------------------------------------------------------
StructKVCompactPluginCreator::StructKVCompactPluginCreator()
{
    mFields = {
        PluginField("mode", nullptr, PluginFieldType::kCHAR, 0),
        PluginField("r_struct", nullptr, PluginFieldType::kFLOAT32, 1),
        PluginField("r_kv", nullptr, PluginFieldType::kFLOAT32, 1),
        PluginField("ratio_num", nullptr, PluginFieldType::kINT32, 1),
        PluginField("ratio_den", nullptr, PluginFieldType::kINT32, 1),
        PluginField("window", nullptr, PluginFieldType::kINT32, 1),
        PluginField("pooling", nullptr, PluginFieldType::kINT32, 1),
        PluginField("pool_mode", nullptr, PluginFieldType::kCHAR, 0),
        PluginField("chunk", nullptr, PluginFieldType::kINT32, 1),
    };
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

PluginFieldCollection const* StructKVCompactPluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

IPluginV3* StructKVCompactPluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, TensorRTPhase phase) noexcept
{
    (void) phase;
    try
    {
        return new StructKVCompactPlugin(CompactParams::fromFields(fc));
    }
    catch (std::exception const& e)
    {
        logError(std::string(name != nullptr ? name : "?") + ": " + e.what());
        return nullptr;
    }
}

} // namespace structkv

// -- dynamic loading: trtexec --dynamicPlugins, IPluginRegistry::loadLibrary, Triton -------------
extern "C"
{
    __attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
    {
        structkv::gLoggerFinder = finder;
    }

    __attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
    {
        static structkv::StructKVCompactPluginCreator creator;
        static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
        nbCreators = 1;
        return creators;
    }
}
