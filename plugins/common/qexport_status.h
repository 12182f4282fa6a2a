// qexport::Status: ok, or an error with a one-line message. Returned by every op's launchers
// and validators (no ONNX Runtime or TensorRT types), turned into an OrtStatus or a TensorRT log
// line by the glue.
#pragma once

#include <exception>
#include <new>
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

// The one-line message of the exception being handled; call only inside a catch block (the
// noexcept entry points end with `catch (...) { return Status::Error(ExceptionMessage()); }`).
inline std::string ExceptionMessage() {
  try {
    throw;
  } catch (const std::bad_alloc&) {
    return "out of memory";
  } catch (const std::exception& e) {
    return std::string("internal error: ") + e.what();
  } catch (...) {
    return "unknown error";
  }
}

}  // namespace qexport
