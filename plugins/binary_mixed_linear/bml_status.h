// Status type shared by the BinaryMixedLinear launcher and validator (no ORT types).
#pragma once

#include <string>
#include <utility>

namespace qexport {

struct Status {
  bool ok = true;
  std::string message;  // one line; empty when ok

  static Status Ok() { return Status{}; }
  static Status Error(std::string msg) { return Status{false, std::move(msg)}; }
  explicit operator bool() const { return ok; }
};

}  // namespace qexport
