/*
 * Host-side unit tests of the StructKVCompact plugin, on CPU, without TensorRT's library: small
 * fakes of IExprBuilder / IDimensionExpr (their implementation classes, as TensorRT's pimpl
 * design requires) evaluate the plugin's shape expressions; field collections are built by
 * hand.
 *
 *   testStructKVCompact                       run the checks; exit 0 when all pass
 *   testStructKVCompact shapes R N n w ...    print K for each (R, N, n, w) quadruple (float R):
 *                                             tests/test_plugins_build.py compares them with the
 *                                             Python budget function
 *   testStructKVCompact chunks p q N n w c .. print the kv_select output length that
 *                                             getOutputShapes declares for chunk mode (R = p/q,
 *                                             chunk c), compared with structkv.selection.
 *                                             selected_count
 */
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "NvInferImpl.h"
#include "NvInferRuntime.h"
#include "structKVCompactPlugin.h"

using namespace nvinfer1;

namespace
{
int gFailures = 0;

#define CHECK(cond)                                                                                                    \
    do                                                                                                                 \
    {                                                                                                                  \
        if (!(cond))                                                                                                   \
        {                                                                                                              \
            std::fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);                                       \
            ++gFailures;                                                                                               \
        }                                                                                                              \
    } while (0)

// -- fakes: a dimension expression is a known integer (shapes are checked for concrete N) ----------
class FakeDimImpl : public apiv::VDimensionExpr
{
public:
    explicit FakeDimImpl(int64_t v)
        : value(v)
    {
    }
    bool isConstant() const override
    {
        return true;
    }
    int64_t getConstantValue() const override
    {
        return value;
    }
    bool isSizeTensor() const override
    {
        return false;
    }
    int64_t value;
};

class FakeDim : public IDimensionExpr
{
public:
    explicit FakeDim(int64_t v)
        : impl(v)
    {
        mImpl = &impl;
    }
    FakeDimImpl impl;
};

int64_t valueOf(IDimensionExpr const* e)
{
    return e->getConstantValue();
}

class FakeBuilderImpl : public apiv::VExprBuilder
{
public:
    IDimensionExpr const* constant(int64_t value) override
    {
        dims.push_back(std::make_unique<FakeDim>(value));
        return dims.back().get();
    }
    IDimensionExpr const* operation(DimensionOperation op, IDimensionExpr const& a, IDimensionExpr const& b) override
    {
        int64_t const x = valueOf(&a);
        int64_t const y = valueOf(&b);
        int64_t r = 0;
        switch (op)
        {
        case DimensionOperation::kSUM: r = x + y; break;
        case DimensionOperation::kPROD: r = x * y; break;
        case DimensionOperation::kMAX: r = x > y ? x : y; break;
        case DimensionOperation::kMIN: r = x < y ? x : y; break;
        case DimensionOperation::kSUB: r = x - y; break;
        case DimensionOperation::kEQUAL: r = x == y; break;
        case DimensionOperation::kLESS: r = x < y; break;
        case DimensionOperation::kFLOOR_DIV: r = x / y - ((x % y != 0) && ((x < 0) != (y < 0))); break;
        case DimensionOperation::kCEIL_DIV: r = x / y + ((x % y != 0) && ((x < 0) == (y < 0))); break;
        }
        return constant(r);
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override
    {
        return nullptr;
    }
    std::vector<std::unique_ptr<FakeDim>> dims;
};

class FakeBuilder : public IExprBuilder
{
public:
    FakeBuilder()
    {
        mImpl = &impl;
    }
    FakeBuilderImpl impl;
};

DimsExprs dimsOf(FakeBuilder& b, std::vector<int64_t> const& values)
{
    DimsExprs d{};
    d.nbDims = static_cast<int32_t>(values.size());
    for (size_t i = 0; i < values.size(); ++i)
    {
        d.d[i] = b.constant(values[i]);
    }
    return d;
}

std::vector<int64_t> valuesOf(DimsExprs const& d)
{
    std::vector<int64_t> out;
    for (int32_t i = 0; i < d.nbDims; ++i)
    {
        out.push_back(valueOf(d.d[i]));
    }
    return out;
}

// -- field collections -------------------------------------------------------------------------------
struct Fields
{
    // Values are kept by value; get() points the PluginFields at this object's own copies, so
    // a Fields can be copied or moved before use.
    struct Entry
    {
        std::string name;
        PluginFieldType type;
        std::string text;
        int32_t i32{};
        float f32{};
    };
    std::vector<Entry> entries;
    std::vector<PluginField> fields;
    PluginFieldCollection fc{};

    Fields& text(char const* name, std::string const& v)
    {
        entries.push_back({name, PluginFieldType::kCHAR, v});
        return *this;
    }
    Fields& i32(char const* name, int32_t v)
    {
        entries.push_back({name, PluginFieldType::kINT32, "", v});
        return *this;
    }
    Fields& f32(char const* name, float v)
    {
        entries.push_back({name, PluginFieldType::kFLOAT32, "", 0, v});
        return *this;
    }
    PluginFieldCollection const* get()
    {
        fields.clear();
        for (Entry const& e : entries)
        {
            void const* data = e.type == PluginFieldType::kCHAR ? static_cast<void const*>(e.text.c_str())
                : e.type == PluginFieldType::kINT32              ? static_cast<void const*>(&e.i32)
                                                                 : static_cast<void const*>(&e.f32);
            int32_t const length = e.type == PluginFieldType::kCHAR ? static_cast<int32_t>(e.text.size() + 1) : 1;
            fields.emplace_back(e.name.c_str(), data, e.type, length);
        }
        fc.nbFields = static_cast<int32_t>(fields.size());
        fc.fields = fields.data();
        return &fc;
    }
};

std::unique_ptr<structkv::StructKVCompactPlugin> create(Fields& f)
{
    static structkv::StructKVCompactPluginCreator creator;
    IPluginV3* p = creator.createPlugin("test", f.get(), TensorRTPhase::kBUILD);
    return std::unique_ptr<structkv::StructKVCompactPlugin>(static_cast<structkv::StructKVCompactPlugin*>(p));
}

DynamicPluginTensorDesc desc(DataType t, TensorFormat format = TensorFormat::kLINEAR)
{
    DynamicPluginTensorDesc d{};
    d.desc.type = t;
    d.desc.format = format;
    return d;
}

//! The kv_select workspace for saliency of at most [layers, heads, n].
size_t kvWorkspace(structkv::StructKVCompactPlugin& p, int64_t layers, int64_t heads, int64_t n)
{
    DynamicPluginTensorDesc in[5]{};
    in[2].max.nbDims = 3;
    in[2].max.d[0] = layers;
    in[2].max.d[1] = heads;
    in[2].max.d[2] = n;
    return p.getWorkspaceSize(in, 5, nullptr, 3);
}

// -- the checks ----------------------------------------------------------------------------------------
void testCreatorAndDefaults()
{
    structkv::StructKVCompactPluginCreator creator;
    CHECK(std::strcmp(creator.getPluginName(), "StructKVCompact") == 0);
    CHECK(std::strcmp(creator.getPluginNamespace(), "structkv") == 0);
    CHECK(std::strcmp(creator.getPluginVersion(), "1") == 0);
    CHECK(creator.getFieldNames()->nbFields == 9);
    Fields none;
    auto p = create(none);
    CHECK(p != nullptr);
    CHECK(p->params().mode == structkv::SelectionMode::kCOMPACT);
    CHECK(p->params().ratio.num == 1 && p->params().ratio.den == 5);
    CHECK(p->params().window == 8 && p->params().pooling == 7 && !p->params().avgPool);
    CHECK(p->params().chunk == 0); // single tokens unless asked
    CHECK(p->getNbOutputs() == 2 && p->getNbInputs() == 2);
    CHECK(p->getCapabilityInterface(PluginCapabilityType::kCORE) != nullptr);
    // the plugin answers with the creator's identity (TensorRT matches the two)
    auto* core = static_cast<IPluginV3OneCore*>(p->getCapabilityInterface(PluginCapabilityType::kCORE));
    CHECK(std::strcmp(core->getPluginName(), creator.getPluginName()) == 0);
    CHECK(std::strcmp(core->getPluginVersion(), creator.getPluginVersion()) == 0);
    CHECK(std::strcmp(core->getPluginNamespace(), creator.getPluginNamespace()) == 0);
    CHECK(p->getCapabilityInterface(PluginCapabilityType::kBUILD) != nullptr);
    CHECK(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME) != nullptr);
}

void testRefusals()
{
    struct Case
    {
        char const* what;
        Fields fields;
    };
    std::vector<Case> cases(11);
    cases[0] = {"bad mode", Fields().text("mode", "sorted")};
    cases[1] = {"even pooling", Fields().i32("pooling", 4)};
    cases[2] = {"window 0", Fields().i32("window", 0)};
    cases[3] = {"ratio 0", Fields().f32("r_kv", 0.0f)};
    cases[4] = {"ratio > 1", Fields().f32("r_struct", 1.5f)};
    cases[5] = {"unknown field", Fields().i32("topk", 3)};
    cases[6] = {"num without den", Fields().i32("ratio_num", 1)};
    cases[7] = {"bad pool_mode", Fields().text("pool_mode", "min")};
    cases[8] = {"window as a float", Fields().f32("window", 8.0f)};
    cases[9] = {"negative chunk", Fields().i32("chunk", -16)};
    cases[10] = {"chunk too large", Fields().i32("chunk", 65537)};
    for (auto& c : cases)
    {
        std::fprintf(stderr, "(expected refusal: %s) ", c.what);
        auto p = create(c.fields);
        CHECK(p == nullptr);
    }
    std::fprintf(stderr, "\n");
}

void testCompactShapesAndTypes()
{
    Fields f;
    f.text("mode", "compact").f32("r_struct", 0.2f).i32("window", 32).i32("pooling", 7).text("pool_mode", "max");
    auto p = create(f);
    CHECK(p != nullptr);
    for (int64_t n : {34, 100, 4096, 19200, 19201, 131072})
    {
        FakeBuilder b;
        DimsExprs in[2] = {dimsOf(b, {1, n, 576}), dimsOf(b, {n})};
        DimsExprs out[2]{};
        CHECK(p->getOutputShapes(in, 2, nullptr, 0, out, 2, b) == 0);
        int64_t const k = std::min((n + 4) / 5, n - 32) + 32;
        CHECK((valuesOf(out[0]) == std::vector<int64_t>{1, k, 576}));
        CHECK((valuesOf(out[1]) == std::vector<int64_t>{k}));
    }
    DataType outTypes[2]{};
    DataType inTypes[2] = {DataType::kHALF, DataType::kFLOAT};
    CHECK(p->getOutputDataTypes(outTypes, 2, inTypes, 2) == 0);
    CHECK(outTypes[0] == DataType::kHALF && outTypes[1] == DataType::kINT64);
    DynamicPluginTensorDesc io[4] = {
        desc(DataType::kBF16), desc(DataType::kFLOAT), desc(DataType::kBF16), desc(DataType::kINT64)};
    for (int pos = 0; pos < 4; ++pos)
    {
        CHECK(p->supportsFormatCombination(pos, io, 2, 2));
    }
    io[1] = desc(DataType::kHALF); // centrality must be fp32
    CHECK(!p->supportsFormatCombination(1, io, 2, 2));
    io[2] = desc(DataType::kFLOAT); // output hidden must match the input
    CHECK(!p->supportsFormatCombination(2, io, 2, 2));
    io[0] = desc(DataType::kINT32);
    CHECK(!p->supportsFormatCombination(0, io, 2, 2));
    io[0] = desc(DataType::kFLOAT, TensorFormat::kCHW32);
    CHECK(!p->supportsFormatCombination(0, io, 2, 2));
    // wrong ranks are refused, not guessed
    FakeBuilder b;
    DimsExprs bad[2] = {dimsOf(b, {100, 576}), dimsOf(b, {100})};
    DimsExprs out[2]{};
    std::fprintf(stderr, "(expected refusal: rank) ");
    CHECK(p->getOutputShapes(bad, 2, nullptr, 0, out, 2, b) != 0);
    std::fprintf(stderr, "\n");
}

void testKvSelectShapesAndWorkspace()
{
    Fields f;
    f.text("mode", "kv_select").f32("r_kv", 0.1f).i32("window", 8).i32("pooling", 1).text("pool_mode", "avg");
    auto p = create(f);
    CHECK(p != nullptr && p->getNbInputs() == 5 && p->getNbOutputs() == 3);
    // after the pivot: n = 700 propagated tokens of a prompt of N = 3000 (budget from N)
    FakeBuilder b;
    DimsExprs in[5] = {dimsOf(b, {15, 3, 700, 64}), dimsOf(b, {15, 3, 700, 64}), dimsOf(b, {15, 3, 700}),
        dimsOf(b, {700}), dimsOf(b, {3000})};
    DimsExprs out[3]{};
    CHECK(p->getOutputShapes(in, 5, nullptr, 0, out, 3, b) == 0);
    CHECK((valuesOf(out[0]) == std::vector<int64_t>{15, 3, 308, 64}));
    CHECK((valuesOf(out[1]) == std::vector<int64_t>{15, 3, 308, 64}));
    CHECK((valuesOf(out[2]) == std::vector<int64_t>{15, 3, 308}));
    // the budget is capped by the candidates: n = 200 -> min(300, 192) + 8 = 200
    FakeBuilder b2;
    DimsExprs in2[5] = {dimsOf(b2, {2, 3, 200, 64}), dimsOf(b2, {2, 3, 200, 64}), dimsOf(b2, {2, 3, 200}),
        dimsOf(b2, {200}), dimsOf(b2, {3000})};
    CHECK(p->getOutputShapes(in2, 5, nullptr, 0, out, 3, b2) == 0);
    CHECK(valueOf(out[2].d[2]) == 200);
    CHECK(kvWorkspace(*p, 15, 3, 1000) >= 45 * 1000 * (sizeof(int32_t) + sizeof(int64_t)));
}

void testSerialisationRoundTripAndClone()
{
    Fields f;
    f.text("mode", "kv_select").f32("r_kv", 0.3f).i32("window", 16).i32("pooling", 5).text("pool_mode", "avg");
    f.i32("chunk", 16);
    auto p = create(f);
    CHECK(p != nullptr);
    PluginFieldCollection const* saved = p->getFieldsToSerialize();
    structkv::StructKVCompactPluginCreator creator;
    std::unique_ptr<IPluginV3> back(creator.createPlugin("restored", saved, TensorRTPhase::kRUNTIME));
    CHECK(back != nullptr);
    auto const& q = static_cast<structkv::StructKVCompactPlugin*>(back.get())->params();
    CHECK(q.mode == structkv::SelectionMode::kKV_SELECT);
    CHECK(q.ratio.num == 3 && q.ratio.den == 10);
    CHECK(q.window == 16 && q.pooling == 5 && q.avgPool && q.chunk == 16);
    std::unique_ptr<IPluginV3> copy(p->clone());
    auto const& c = static_cast<structkv::StructKVCompactPlugin*>(copy.get())->params();
    CHECK(c.mode == q.mode && c.ratio.num == 3 && c.window == 16 && c.avgPool && c.chunk == 16);
    std::unique_ptr<IPluginV3> attached(p->attachToContext(nullptr));
    CHECK(attached != nullptr);
}

//! Chunk mode: the declared output lengths (kv_select, so n and N differ) and the workspace, which
//! holds the pooled scores and the chosen chunks beside the keys and indices.
void testChunkShapesAndWorkspace()
{
    Fields f;
    f.text("mode", "kv_select").f32("r_kv", 0.1f).i32("window", 8).i32("chunk", 16);
    auto p = create(f);
    CHECK(p != nullptr);
    // n = 700 of N = 3000: budget 300, candidates 692 = 43 chunks + 4, keep (300 - 4) / 16 = 18
    FakeBuilder b;
    DimsExprs in[5] = {dimsOf(b, {15, 3, 700, 64}), dimsOf(b, {15, 3, 700, 64}), dimsOf(b, {15, 3, 700}),
        dimsOf(b, {700}), dimsOf(b, {3000})};
    DimsExprs out[3]{};
    CHECK(p->getOutputShapes(in, 5, nullptr, 0, out, 3, b) == 0);
    CHECK((valuesOf(out[0]) == std::vector<int64_t>{15, 3, 18 * 16 + 4 + 8, 64}));
    CHECK((valuesOf(out[2]) == std::vector<int64_t>{15, 3, 18 * 16 + 4 + 8}));
    CHECK(kvWorkspace(*p, 15, 3, 1000) >= 45 * 1000 * (sizeof(int32_t) + 2 * sizeof(int64_t) + sizeof(float)));
}

int printChunkShapes(int argc, char** argv)
{
    // sextuples after "chunks": ratio_num ratio_den N n window chunk -> K, from getOutputShapes
    for (int i = 2; i + 5 < argc; i += 6)
    {
        Fields f;
        f.text("mode", "kv_select").i32("ratio_num", std::atoi(argv[i])).i32("ratio_den", std::atoi(argv[i + 1]));
        f.i32("window", std::atoi(argv[i + 4])).i32("chunk", std::atoi(argv[i + 5]));
        auto p = create(f);
        int64_t const promptLen = std::strtoll(argv[i + 2], nullptr, 10);
        int64_t const n = std::strtoll(argv[i + 3], nullptr, 10);
        FakeBuilder b;
        DimsExprs in[5] = {dimsOf(b, {1, 1, n, 4}), dimsOf(b, {1, 1, n, 4}), dimsOf(b, {1, 1, n}), dimsOf(b, {n}),
            dimsOf(b, {promptLen})};
        DimsExprs out[3]{};
        if (p == nullptr || p->getOutputShapes(in, 5, nullptr, 0, out, 3, b) != 0)
        {
            return 1;
        }
        std::printf("%lld\n", static_cast<long long>(valueOf(out[2].d[2])));
    }
    return 0;
}

int printShapes(int argc, char** argv)
{
    // quadruples after "shapes": ratio N n window -> K
    for (int i = 2; i + 3 < argc; i += 4)
    {
        structkv::Ratio const r = structkv::limitDenominator(std::strtod(argv[i], nullptr));
        int64_t const promptLen = std::strtoll(argv[i + 1], nullptr, 10);
        int64_t const n = std::strtoll(argv[i + 2], nullptr, 10);
        int64_t const w = std::strtoll(argv[i + 3], nullptr, 10);
        std::printf("%lld\n", static_cast<long long>(structkv::keptCount(r, promptLen, n, w)));
    }
    return 0;
}
} // namespace

extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);

int main(int argc, char** argv)
{
    if (argc > 1 && std::strcmp(argv[1], "shapes") == 0)
    {
        return printShapes(argc, argv);
    }
    if (argc > 1 && std::strcmp(argv[1], "chunks") == 0)
    {
        return printChunkShapes(argc, argv);
    }
    int32_t count = 0;
    IPluginCreatorInterface* const* creators = getCreators(count);
    CHECK(count == 1 && creators != nullptr && creators[0] != nullptr);
    testCreatorAndDefaults();
    testRefusals();
    testCompactShapesAndTypes();
    testKvSelectShapesAndWorkspace();
    testSerialisationRoundTripAndClone();
    testChunkShapesAndWorkspace();
    if (gFailures != 0)
    {
        std::fprintf(stderr, "%d check(s) failed\n", gFailures);
        return 1;
    }
    std::printf("all StructKVCompact host checks passed\n");
    return 0;
}
