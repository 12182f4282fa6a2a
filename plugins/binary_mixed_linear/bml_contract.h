// The contract of qexport::BinaryMixedLinear, C++ side: op name, packed layout, input
// positions, attribute names. Mirrors qexport/ops/binary_mixed_linear/contract.py constant by
// constant (tests/test_contract.py parses this file and compares: kFooBar <-> FOO_BAR). The
// shared constants (domain, versions) are plugins/common/qexport_contract.h. Format:
// docs/format.md.
#pragma once

#include "qexport_contract.h"

namespace qexport {
namespace bml {

constexpr const char* kOpName = "BinaryMixedLinear";

constexpr int kLayoutRowMajor = 1;

constexpr int kSalientBits = 4;
constexpr int kSalientQmax = 15;

constexpr int kInX = 0;
constexpr int kInSignPacked = 1;
constexpr int kInRowScale = 2;
constexpr int kInRowOffset = 3;
constexpr int kInSalientIdx = 4;
constexpr int kInSalientPacked = 5;
constexpr int kInSalientScale = 6;
constexpr int kInSalientZero = 7;
constexpr int kInR2 = 8;
constexpr int kInBias = 9;
constexpr int kNumInputs = 10;

constexpr const char* kAttrInFeatures = "in_features";
constexpr const char* kAttrOutFeatures = "out_features";
constexpr const char* kAttrSalientGroupSize = "salient_group_size";
constexpr const char* kAttrLayout = "layout";

}  // namespace bml
}  // namespace qexport
