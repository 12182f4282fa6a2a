// Host-only tests of libqexport_trt.so (no GPU, no libnvinfer): the library is loaded with
// dlopen, exactly as TensorRT loads a plugin library, and the plugin is driven through
// TensorRT's interfaces: creators and fields, field parsing and bad attributes, serialize /
// deserialize / clone round trips, output types and shapes (a mock IExprBuilder), format
// combinations, build-time shape checks. Usage: qexport_test_trt_plugin path/to/libqexport_trt.so
// Prints one line per failed check and "N checks, F failed"; exit status 1 on a failure.
#include <NvInferRuntime.h>
#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <deque>
#include <string>
#include <vector>

#include "binary_mixed_linear/bml_contract.h"

using namespace nvinfer1;

namespace {

int g_checks = 0, g_failed = 0;
#define CHECK(cond)                                                        \
  do {                                                                     \
    ++g_checks;                                                            \
    if (!(cond)) {                                                         \
      ++g_failed;                                                          \
      std::printf("FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond);       \
    }                                                                      \
  } while (0)

// ---- a logger that records the last error
struct Logger : ILogger {
  std::string last;
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kERROR) last = msg;
  }
} g_logger;
struct Finder : ILoggerFinder {
  ILogger* findLogger() override { return &g_logger; }
} g_finder;

// ---- a mock IExprBuilder (TensorRT offers no public one)
struct ConstImpl : apiv::VDimensionExpr {
  int64_t value;
  bool constant;
  ConstImpl(int64_t v, bool c) : value(v), constant(c) {}
  bool isConstant() const override { return constant; }
  int64_t getConstantValue() const override { return constant ? value : INT64_MIN; }
  bool isSizeTensor() const override { return false; }
};
struct Expr : IDimensionExpr {
  explicit Expr(apiv::VDimensionExpr* impl) { mImpl = impl; }
};
struct BuilderImpl : apiv::VExprBuilder {
  std::deque<ConstImpl> impls;
  std::deque<Expr> exprs;
  const IDimensionExpr* Make(int64_t v, bool c) {
    impls.emplace_back(v, c);
    exprs.emplace_back(&impls.back());
    return &exprs.back();
  }
  const IDimensionExpr* constant(int64_t value) override { return Make(value, true); }
  const IDimensionExpr* operation(DimensionOperation, const IDimensionExpr&,
                                  const IDimensionExpr&) override {
    return Make(0, false);
  }
  const IDimensionExpr* declareSizeTensor(int32_t, const IDimensionExpr&,
                                          const IDimensionExpr&) override {
    return nullptr;
  }
};
struct Builder : IExprBuilder {
  explicit Builder(apiv::VExprBuilder* impl) { mImpl = impl; }
};

// ---- helpers
struct Fields {
  std::vector<int32_t> v32;
  std::vector<int64_t> v64;
  std::vector<PluginField> f;
  PluginFieldCollection fc{};
  Fields(int64_t k, int64_t n, int64_t g, int64_t layout, bool as64 = false) {
    namespace bml = qexport::bml;
    const char* names[4] = {bml::kAttrInFeatures, bml::kAttrOutFeatures,
                            bml::kAttrSalientGroupSize, bml::kAttrLayout};
    const int64_t vals[4] = {k, n, g, layout};
    v32.assign(vals, vals + 4);
    v64.assign(vals, vals + 4);
    for (int i = 0; i < 4; ++i)
      f.emplace_back(names[i], as64 ? static_cast<const void*>(&v64[i]) : &v32[i],
                     as64 ? PluginFieldType::kINT64 : PluginFieldType::kINT32, 1);
    Sync();
  }
  void Sync() {
    fc.nbFields = static_cast<int32_t>(f.size());
    fc.fields = f.data();
  }
};

IPluginV3OneCore* Core(IPluginV3* p) {
  return static_cast<IPluginV3OneCore*>(p->getCapabilityInterface(PluginCapabilityType::kCORE));
}
IPluginV3OneBuild* Build(IPluginV3* p) {
  return static_cast<IPluginV3OneBuild*>(p->getCapabilityInterface(PluginCapabilityType::kBUILD));
}
IPluginV3OneRuntime* Runtime(IPluginV3* p) {
  return static_cast<IPluginV3OneRuntime*>(
      p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
}

Dims MakeDims(std::vector<int64_t> d) {
  Dims r{};
  r.nbDims = static_cast<int32_t>(d.size());
  for (size_t i = 0; i < d.size(); ++i) r.d[i] = d[i];
  return r;
}

// Descs of a valid layer: K=13, N=7, S=3, G=2 (groups 2), M=5; optional inputs per nb.
std::vector<DynamicPluginTensorDesc> Descs(int nb, DataType act, bool r2_in_9 = true) {
  const int64_t k = 13, n = 7, s = 3, kb = 10;
  struct T { DataType t; std::vector<int64_t> d; };
  std::vector<T> in = {{act, {5, k}},
                       {DataType::kUINT8, {n, 2}},
                       {DataType::kHALF, {n}},
                       {DataType::kHALF, {n}},
                       {DataType::kINT32, {s}},
                       {DataType::kUINT8, {n, 2}},
                       {DataType::kHALF, {n, 2}},
                       {DataType::kUINT8, {n, 2}}};
  if (nb == 10) {
    in.push_back({DataType::kHALF, {kb}});
    in.push_back({DataType::kFLOAT, {n}});
  } else if (nb == 9) {
    in.push_back(r2_in_9 ? T{DataType::kHALF, {kb}} : T{DataType::kFLOAT, {n}});
  }
  in.push_back({act, {5, n}});  // output
  std::vector<DynamicPluginTensorDesc> out(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    out[i].desc.dims = MakeDims(in[i].d);
    out[i].desc.type = in[i].t;
    out[i].desc.format = TensorFormat::kLINEAR;
    out[i].desc.scale = 1.0f;
    out[i].min = out[i].max = out[i].opt = out[i].desc.dims;
  }
  return out;
}

// What the checks share: the library's creators, the canonical one and its field names.
struct Library {
  IPluginCreatorInterface* const* creators = nullptr;
  int32_t nb = 0;
  IPluginCreatorV3One* creator = nullptr;  // namespace "qexport"
  const PluginFieldCollection* names = nullptr;
};

// ---- creators: "qexport" and "", the plugin's name, version and fields. False: no
// canonical creator (nothing else can be checked).
bool CheckCreators(Library* lib) {
  IPluginCreatorInterface* const* creators = lib->creators;
  const int32_t nb = lib->nb;
  CHECK(nb == 2);
  IPluginCreatorV3One*& creator = lib->creator;
  bool saw_default = false;
  for (int32_t i = 0; i < nb; ++i) {
    InterfaceInfo info = creators[i]->getInterfaceInfo();
    CHECK(std::strcmp(info.kind, "PLUGIN CREATOR_V3ONE") == 0 && info.major == 1);
    auto* c = static_cast<IPluginCreatorV3One*>(creators[i]);
    CHECK(std::strcmp(c->getPluginName(), "BinaryMixedLinear") == 0);
    CHECK(std::strcmp(c->getPluginVersion(), "1") == 0);
    if (std::strcmp(c->getPluginNamespace(), "qexport") == 0) creator = c;
    if (std::strcmp(c->getPluginNamespace(), "") == 0) saw_default = true;
  }
  CHECK(creator != nullptr);
  CHECK(saw_default);
  if (!creator) return false;
  const PluginFieldCollection* names = creator->getFieldNames();
  lib->names = names;
  CHECK(names && names->nbFields == 4);
  if (names && names->nbFields == 4) {
    CHECK(std::strcmp(names->fields[0].name, "in_features") == 0);
    CHECK(std::strcmp(names->fields[1].name, "out_features") == 0);
    CHECK(std::strcmp(names->fields[2].name, "salient_group_size") == 0);
    CHECK(std::strcmp(names->fields[3].name, "layout") == 0);
  }
  return true;
}

// ---- field parsing: good fields (int32, int64, extra fields), bad ones (each logged with the
// field named). Returns the plugin made from `good`, or null.
IPluginV3* CheckFieldParsing(const Library& lib, Fields& good) {
  IPluginCreatorV3One* creator = lib.creator;
  IPluginV3* plugin = creator->createPlugin("bml0", &good.fc, TensorRTPhase::kBUILD);
  CHECK(plugin != nullptr);
  if (!plugin) return nullptr;
  CHECK(std::strcmp(plugin->getInterfaceInfo().kind, "PLUGIN") == 0);
  CHECK(std::strcmp(Core(plugin)->getPluginName(), "BinaryMixedLinear") == 0);
  CHECK(std::strcmp(Core(plugin)->getPluginVersion(), "1") == 0);
  CHECK(std::strcmp(Core(plugin)->getPluginNamespace(), "qexport") == 0);
  CHECK(Build(plugin)->getNbOutputs() == 1);
  CHECK(Runtime(plugin) != nullptr);

  Fields good64(13, 7, 2, 1, /*as64=*/true);
  IPluginV3* p64 = creator->createPlugin("bml64", &good64.fc, TensorRTPhase::kBUILD);
  CHECK(p64 != nullptr);
  delete p64;

  // extra fields from the ONNX parser are ignored
  Fields extra(13, 7, 0, 1);
  const char ns[] = "qexport";
  extra.f.emplace_back("plugin_namespace", ns, PluginFieldType::kCHAR, 7);
  extra.Sync();
  IPluginV3* pe = creator->createPlugin("bmlx", &extra.fc, TensorRTPhase::kBUILD);
  CHECK(pe != nullptr);
  delete pe;

  struct Bad { const char* what; Fields f; const char* expect; };
  std::vector<Bad> bads;
  bads.push_back({"layout 2", Fields(13, 7, 2, 2), "layout"});
  bads.push_back({"in_features 0", Fields(0, 7, 2, 1), "in_features"});
  bads.push_back({"out_features -1", Fields(13, -1, 2, 1), "out_features"});
  bads.push_back({"group -3", Fields(13, 7, -3, 1), "salient_group_size"});
  {
    Fields f(13, 7, 2, 1);
    f.f.pop_back();
    f.Sync();
    bads.push_back({"missing layout", f, "missing field 'layout'"});
  }
  {
    Fields f(13, 7, 2, 1);
    static const float one = 1.0f;
    f.f[0] = PluginField("in_features", &one, PluginFieldType::kFLOAT32, 1);
    bads.push_back({"float field", f, "kINT32 or kINT64"});
  }
  {
    Fields f(13, 7, 2, 1);
    f.f[1].length = 2;
    bads.push_back({"length 2", f, "length 2"});
  }
  for (Bad& b : bads) {
    b.f.Sync();
    g_logger.last.clear();
    IPluginV3* p = creator->createPlugin("bad", &b.f.fc, TensorRTPhase::kBUILD);
    CHECK(p == nullptr);
    delete p;
    const bool logged = g_logger.last.find(b.expect) != std::string::npos;
    if (!logged) std::printf("  (%s) logged: '%s'\n", b.what, g_logger.last.c_str());
    CHECK(logged);
  }
  CHECK(creator->createPlugin("null", nullptr, TensorRTPhase::kBUILD) == nullptr);
  return plugin;
}

// ---- serialize / deserialize / clone / attach, in both namespaces
void CheckSerialization(const Library& lib, IPluginV3* plugin, const Fields& good) {
  IPluginCreatorV3One* creator = lib.creator;
  const PluginFieldCollection* names = lib.names;
  IPluginCreatorInterface* const* creators = lib.creators;
  const int32_t nb = lib.nb;
  const PluginFieldCollection* ser = Runtime(plugin)->getFieldsToSerialize();
  CHECK(ser != nullptr && ser->nbFields == 4);
  IPluginV3* restored = creator->createPlugin("bml0", ser, TensorRTPhase::kRUNTIME);
  CHECK(restored != nullptr);
  if (restored) {
    const PluginFieldCollection* ser2 = Runtime(restored)->getFieldsToSerialize();
    CHECK(ser2 && ser2->nbFields == 4);
    for (int i = 0; ser2 && i < 4; ++i) {
      CHECK(std::strcmp(ser2->fields[i].name, names->fields[i].name) == 0);
      CHECK(ser2->fields[i].type == PluginFieldType::kINT32 && ser2->fields[i].length == 1);
      CHECK(*static_cast<const int32_t*>(ser2->fields[i].data) ==
            *static_cast<const int32_t*>(good.fc.fields[i].data));
    }
    delete restored;
  }
  IPluginV3* cloned = plugin->clone();
  CHECK(cloned != nullptr && cloned != plugin);
  if (cloned) {
    CHECK(std::strcmp(Core(cloned)->getPluginNamespace(), "qexport") == 0);
    const PluginFieldCollection* s3 = Runtime(cloned)->getFieldsToSerialize();
    CHECK(s3 && *static_cast<const int32_t*>(s3->fields[1].data) == 7);
    delete cloned;
  }
  IPluginV3* attached = Runtime(plugin)->attachToContext(nullptr);
  CHECK(attached != nullptr && attached != plugin);
  delete attached;
  // A plugin created by the "" creator keeps "" (deserialization looks the creator up by it).
  for (int32_t i = 0; i < nb; ++i) {
    auto* c = static_cast<IPluginCreatorV3One*>(creators[i]);
    if (std::strcmp(c->getPluginNamespace(), "") != 0) continue;
    IPluginV3* p = c->createPlugin("bml_default", &good.fc, TensorRTPhase::kBUILD);
    CHECK(p && std::strcmp(Core(p)->getPluginNamespace(), "") == 0);
    if (p) {
      IPluginV3* pc = p->clone();
      CHECK(pc && std::strcmp(Core(pc)->getPluginNamespace(), "") == 0);
      delete pc;
    }
    delete p;
  }
}

// ---- output types, and output shapes through a mock IExprBuilder
void CheckOutputTypesAndShapes(IPluginV3OneBuild* build) {
  DataType out_t = DataType::kINT8;
  DataType in_f[1] = {DataType::kFLOAT}, in_h[1] = {DataType::kHALF}, in_i[1] = {DataType::kINT32};
  CHECK(build->getOutputDataTypes(&out_t, 1, in_f, 10) == 0 && out_t == DataType::kFLOAT);
  CHECK(build->getOutputDataTypes(&out_t, 1, in_h, 10) == 0 && out_t == DataType::kHALF);
  CHECK(build->getOutputDataTypes(&out_t, 1, in_i, 10) != 0);

  // ---- output shapes through a mock IExprBuilder
  BuilderImpl bimpl;
  Builder builder(&bimpl);
  DimsExprs x{};
  x.nbDims = 3;
  x.d[0] = bimpl.Make(0, false);  // symbolic batch
  x.d[1] = bimpl.Make(4, true);
  x.d[2] = bimpl.Make(13, true);
  std::vector<DimsExprs> ins(10, x);
  DimsExprs out{};
  CHECK(build->getOutputShapes(ins.data(), 10, nullptr, 0, &out, 1, builder) == 0);
  CHECK(out.nbDims == 3 && out.d[0] == x.d[0] && out.d[1] == x.d[1]);
  CHECK(out.d[2] && out.d[2]->isConstant() && out.d[2]->getConstantValue() == 7);
  ins[0].d[2] = bimpl.Make(12, true);
  g_logger.last.clear();
  CHECK(build->getOutputShapes(ins.data(), 10, nullptr, 0, &out, 1, builder) != 0);
  CHECK(g_logger.last.find("in_features=13") != std::string::npos);
  ins[0].nbDims = 0;
  CHECK(build->getOutputShapes(ins.data(), 10, nullptr, 0, &out, 1, builder) != 0);
  CHECK(build->getOutputShapes(ins.data(), 7, nullptr, 0, &out, 1, builder) != 0);
}

// ---- format combinations: every position's type and format, the 9-input r2/bias case
void CheckFormats(IPluginV3OneBuild* build) {
  for (int nbi : {8, 9, 10}) {
    for (DataType act : {DataType::kFLOAT, DataType::kHALF}) {
      auto d = Descs(nbi, act);
      for (int pos = 0; pos <= nbi; ++pos) CHECK(build->supportsFormatCombination(pos, d.data(), nbi, 1));
      for (int pos = 0; pos <= nbi; ++pos) {
        auto bad = d;
        bad[pos].desc.type = DataType::kBOOL;
        CHECK(!build->supportsFormatCombination(pos, bad.data(), nbi, 1));
        bad = d;
        bad[pos].desc.format = TensorFormat::kCHW32;
        CHECK(!build->supportsFormatCombination(pos, bad.data(), nbi, 1));
      }
      auto mismatch = d;
      mismatch[nbi].desc.type = act == DataType::kFLOAT ? DataType::kHALF : DataType::kFLOAT;
      CHECK(!build->supportsFormatCombination(nbi, mismatch.data(), nbi, 1));
    }
  }
  {
    auto d = Descs(9, DataType::kFLOAT, /*r2_in_9=*/false);  // 9 inputs: #8 is bias
    CHECK(build->supportsFormatCombination(8, d.data(), 9, 1));
    auto d10 = Descs(10, DataType::kFLOAT);
    d10[8].desc.type = DataType::kFLOAT;  // with 10 inputs #8 must be r2 (half)
    CHECK(!build->supportsFormatCombination(8, d10.data(), 10, 1));
    CHECK(!build->supportsFormatCombination(0, d10.data(), 7, 1));
    CHECK(!build->supportsFormatCombination(11, d10.data(), 10, 1));
  }
}

// ---- build-time shape checks (configurePlugin, the shared validator) and workspace; the same
// checks on concrete shapes in onShapeChange
void CheckBuildShapes(IPluginV3* plugin) {
  IPluginV3OneBuild* build = Build(plugin);
  for (int nbi : {8, 9, 10}) {
    auto d = Descs(nbi, DataType::kHALF);
    CHECK(build->configurePlugin(d.data(), nbi, d.data() + nbi, 1) == 0);
    CHECK(build->getWorkspaceSize(d.data(), nbi, d.data() + nbi, 1) >= 13 * sizeof(int32_t));
  }
  {
    auto d = Descs(9, DataType::kFLOAT, false);
    CHECK(build->configurePlugin(d.data(), 9, d.data() + 9, 1) == 0);
    struct Case { int pos; std::vector<int64_t> dims; const char* expect; };
    // The shared validator's messages (bml_validate.cpp): input, contract position, shapes.
    // (With 9 inputs TensorRT's #8 is bias, the contract's #9.)
    std::vector<Case> cases = {
        {1, {7, 3}, "'sign_packed' (#1) is uint8 [7, 3], expected uint8 [7, 2]"},
        {2, {6}, "'row_scale' (#2) is float16 [6], expected float16 [7]"},
        {5, {7, 1}, "'salient_packed' (#5) is uint8 [7, 1], expected uint8 [7, 2]"},
        {6, {7, 1}, "'salient_scale' (#6) is float16 [7, 1], expected float16 [7, 2]"},
        {7, {7, 3}, "'salient_zero' (#7) is uint8 [7, 3], expected uint8 [7, 2]"},
        {0, {5, 12}, "'X' (#0) is float [5, 12], expected shape [..., 13]"},
        {0, {}, "'X' (#0) is float [], expected shape [..., 13]"},
        {4, {14}, "'salient_idx' (#4) is int32 [14], more channels than in_features=13"},
        {4, {3, 1}, "'salient_idx' (#4) is int32 [3, 1], expected int32 [S]"},
        {8, {6}, "'bias' (#9) is float [6], expected float [7]"}};
    for (const Case& c : cases) {
      auto bad = Descs(9, DataType::kFLOAT, false);
      bad[c.pos].desc.dims = MakeDims(c.dims);
      g_logger.last.clear();
      CHECK(build->configurePlugin(bad.data(), 9, bad.data() + 9, 1) != 0);
      const bool named = g_logger.last.find(c.expect) != std::string::npos;
      if (!named) std::printf("  (pos %d) logged: '%s'\n", c.pos, g_logger.last.c_str());
      CHECK(named);
    }
    auto r2bad = Descs(10, DataType::kFLOAT);
    r2bad[8].desc.dims = MakeDims({9});
    g_logger.last.clear();
    CHECK(build->configurePlugin(r2bad.data(), 10, r2bad.data() + 10, 1) != 0);
    CHECK(g_logger.last.find("'r2'") != std::string::npos);
    auto rs_float = Descs(10, DataType::kFLOAT);
    rs_float[2].desc.type = DataType::kFLOAT;
    g_logger.last.clear();
    CHECK(build->configurePlugin(rs_float.data(), 10, rs_float.data() + 10, 1) != 0);
    CHECK(g_logger.last.find("'row_scale' (#2) is float [7], expected float16 [7]") !=
          std::string::npos);
    auto int8 = Descs(10, DataType::kFLOAT);  // int8 is a byte type too
    for (int pos : {1, 5, 7}) int8[pos].desc.type = DataType::kINT8;
    CHECK(build->configurePlugin(int8.data(), 10, int8.data() + 10, 1) == 0);
    // Unknown dims (-1) are accepted, and so are the dims that depend on an unknown S; the
    // known ones are still checked.
    auto unknown = Descs(10, DataType::kFLOAT);
    unknown[1].desc.dims = MakeDims({-1, 2});
    unknown[4].desc.dims = MakeDims({-1});
    unknown[5].desc.dims = MakeDims({7, 5});  // would be wrong for S = 3
    CHECK(build->configurePlugin(unknown.data(), 10, unknown.data() + 10, 1) == 0);
    unknown[2].desc.dims = MakeDims({6});
    g_logger.last.clear();
    CHECK(build->configurePlugin(unknown.data(), 10, unknown.data() + 10, 1) != 0);
    CHECK(g_logger.last.find("'row_scale' (#2) is float16 [6], expected float16 [7]") !=
          std::string::npos);
    auto dyn = Descs(10, DataType::kFLOAT);
    dyn[0].desc.dims = MakeDims({-1, 13});  // dynamic batch is fine
    CHECK(build->configurePlugin(dyn.data(), 10, dyn.data() + 10, 1) == 0);
    dyn[0].desc.dims = MakeDims({-1, -1});  // so is an unknown in_features
    CHECK(build->configurePlugin(dyn.data(), 10, dyn.data() + 10, 1) == 0);
    dyn[0].desc.dims = MakeDims({-1, 13});
    // onShapeChange runs the same checks on concrete shapes
    std::vector<PluginTensorDesc> rt;
    for (auto& x2 : dyn) rt.push_back(x2.desc);
    rt[0].dims = MakeDims({3, 13});
    CHECK(Runtime(plugin)->onShapeChange(rt.data(), 10, rt.data() + 10, 1) == 0);
    rt[1].dims = MakeDims({7, 1});
    CHECK(Runtime(plugin)->onShapeChange(rt.data(), 10, rt.data() + 10, 1) != 0);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::printf("usage: %s libqexport_trt.so\n", argv[0]);
    return 2;
  }
  void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    std::printf("dlopen failed: %s\n", dlerror());
    return 2;
  }
  using GetCreators = IPluginCreatorInterface* const* (*)(int32_t&);
  using SetLoggerFinder = void (*)(ILoggerFinder*);
  auto get_creators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
  auto set_finder = reinterpret_cast<SetLoggerFinder>(dlsym(lib, "setLoggerFinder"));
  CHECK(get_creators != nullptr);
  CHECK(set_finder != nullptr);
  CHECK(dlsym(lib, "qexport_contract_version") != nullptr);
  if (!get_creators || !set_finder) return 1;
  set_finder(&g_finder);

  Library library;
  library.creators = get_creators(library.nb);
  if (!CheckCreators(&library)) return 1;
  Fields good(13, 7, 2, 1);
  IPluginV3* plugin = CheckFieldParsing(library, good);
  if (!plugin) return 1;
  CheckSerialization(library, plugin, good);
  CheckOutputTypesAndShapes(Build(plugin));
  CheckFormats(Build(plugin));
  CheckBuildShapes(plugin);
  delete plugin;

  std::printf("%d checks, %d failed\n", g_checks, g_failed);
  return g_failed ? 1 : 0;
}
