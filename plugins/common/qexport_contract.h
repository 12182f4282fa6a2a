// The qexport contract every op shares, C++ side: ONNX domain, op-set and contract versions.
// Mirrors qexport/contract.py constant by constant (tests/test_contract.py parses this file and
// compares). Each op's own constants (inputs, attributes, layout) are in its folder:
// plugins/<op>/*_contract.h. Format: docs/format.md.
#pragma once

namespace qexport {

constexpr const char* kDomain = "qexport";
constexpr int kOpsetVersion = 1;
// Bump when any op's inputs, attributes or packed bit order change meaning; the libraries
// report it (qexport_contract_version) and qexport.native checks it at load time.
constexpr int kContractVersion = 1;

}  // namespace qexport
