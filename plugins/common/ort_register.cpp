// Entry points of libqexport_ops.so, the only exported symbols:
//   RegisterCustomOps: called by ONNX Runtime (SessionOptions.register_custom_ops_library /
//     Ort::SessionOptions::RegisterCustomOpsLibrary); adds the qexport op domain.
//   qexport_contract_version: lets qexport.native check the library matches the Python side.
// The library links no libonnxruntime: it uses the OrtApi table handed over here.
//
// The ops, one line each in AddOps below (and one include): each op's Add...Ops adds its
// variants (activation types; the CUDA execution provider ones when built with
// QEXPORT_BUILD_CUDA). The op's sources come from its folder's CMakeLists.txt.
#include <mutex>
#include <string>

#include "binary_mixed_linear/ort_op.h"
#include "onnxruntime_cxx_api.h"
#include "qexport_contract.h"

#define QEXPORT_EXPORT __attribute__((visibility("default")))

namespace {

// One domain for the whole process, added to every SessionOptions that registers the library.
// Sessions keep a pointer to it, so it is never destroyed (no release at exit, when ONNX
// Runtime may already be unloaded).
std::mutex g_domain_mutex;
Ort::CustomOpDomain* g_domain = nullptr;

// Every op of the library.
void AddOps(Ort::CustomOpDomain& domain) {
  qexport::AddBinaryMixedLinearOps(domain);
}

}  // namespace

extern "C" {

QEXPORT_EXPORT int qexport_contract_version() { return qexport::kContractVersion; }

QEXPORT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                          const OrtApiBase* api_base) {
  if (!api_base) return nullptr;  // nothing to report the error with
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) {
    const OrtApi* v1 = api_base->GetApi(1);
    if (!v1) return nullptr;
    const std::string msg =
        std::string("libqexport_ops was built for ONNX Runtime API ") +
        std::to_string(ORT_API_VERSION) + " (onnxruntime >= 1." + std::to_string(ORT_API_VERSION) +
        ") but the running onnxruntime is " + api_base->GetVersionString() + ": upgrade onnxruntime";
    return v1->CreateStatus(ORT_FAIL, msg.c_str());
  }
  Ort::InitApi(api);
  try {
    std::lock_guard<std::mutex> lock(g_domain_mutex);
    if (!g_domain) {
      auto* domain = new Ort::CustomOpDomain(qexport::kDomain);
      AddOps(*domain);
      g_domain = domain;
    }
    Ort::UnownedSessionOptions session_options(options);
    session_options.Add(*g_domain);
    return nullptr;
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  } catch (...) {
    return api->CreateStatus(ORT_FAIL, "qexport: unknown error in RegisterCustomOps");
  }
}

}  // extern "C"
