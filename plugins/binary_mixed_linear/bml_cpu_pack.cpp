// qexport::BinaryMixedLinear CPU kernel: PackWeights, layout 1 -> the packed form the fast
// kernels read (layout in bml_cpu_internal.h, design in docs/kernels.md). Packing is a copy of
// the layout-1 bytes into their new order (plus padding) and the fp16 parameters as fp32; with
// release_source the layout-1 pages are handed back to the OS as packing moves past them.
#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "binary_mixed_linear/bml_cpu_internal.h"
#include "qexport_arena.h"
#include "qexport_fp16.h"

namespace qexport {
namespace bml {
namespace {

// Sizes and block geometry, and the channel lists (which input channels are binary); an error
// when salient_idx is not strictly increasing within [0, k).
Status PackChannels(const Args& a, PackedWeights* p) {
  p->k = a.k;
  p->n = a.n;
  p->s = a.s;
  p->kb = a.k - a.s;
  p->group_size = a.group_size;
  p->groups = NumGroups(a.s, a.group_size);
  p->nblk = (a.n + kRowBlock - 1) / kRowBlock;
  p->npad = p->nblk * kRowBlock;
  p->ngrp = (p->nblk + kGroupBlocks - 1) / kGroupBlocks;

  std::vector<uint8_t> is_salient(static_cast<size_t>(a.k), 0);
  for (int64_t j = 0; j < a.s; ++j) {
    const int64_t c = a.salient_idx[j];
    if (c < 0 || c >= a.k || (j > 0 && c <= a.salient_idx[j - 1]))
      return Status::Error("salient_idx[" + std::to_string(j) + "] = " + std::to_string(c) +
                           " is not strictly increasing within [0, " + std::to_string(a.k) +
                           ")");
    is_salient[c] = 1;
  }
  p->bin_chan.reserve(static_cast<size_t>(p->kb));
  p->bin_mask.assign(static_cast<size_t>((a.k + 15) / 16), 0);
  for (int64_t c = 0; c < a.k; ++c) {
    if (is_salient[c]) continue;
    p->bin_chan.push_back(static_cast<int32_t>(c));
    p->bin_mask[c / 16] |= static_cast<uint16_t>(1u << (c % 16));
  }
  return Status::Ok();
}

// row_scale, row_offset (and their sum and difference), r2 and bias as fp32 rows padded to
// npad; clears p->finite when an fp16 value is not finite.
void PackRowParameters(const Args& a, PackedWeights* p) {
  const int64_t n = a.n, npad = p->npad;
  auto half_row = [&](const uint16_t* src, int64_t count, std::vector<float>* dst) {
    dst->assign(static_cast<size_t>(npad), 0.0f);
    for (int64_t i = 0; i < count; ++i) {
      p->finite = p->finite && HalfIsFinite(src[i]);
      (*dst)[i] = HalfToFloat(src[i]);
    }
  };
  half_row(a.row_scale, n, &p->rs);
  half_row(a.row_offset, n, &p->ro);
  p->pos.resize(static_cast<size_t>(npad));
  p->neg.resize(static_cast<size_t>(npad));
  for (int64_t i = 0; i < npad; ++i) {
    p->pos[i] = p->ro[i] + p->rs[i];
    p->neg[i] = p->ro[i] - p->rs[i];
  }
  if (a.r2) {
    p->r2.resize(static_cast<size_t>(p->kb));
    for (int64_t c = 0; c < p->kb; ++c) {
      p->finite = p->finite && HalfIsFinite(a.r2[c]);
      p->r2[c] = HalfToFloat(a.r2[c]);
    }
  }
  if (a.bias) {
    p->bias.assign(static_cast<size_t>(npad), 0.0f);
    std::copy(a.bias, a.bias + n, p->bias.begin());
  }
}

// Sizes: sign rows in dwords; salient groups padded to a multiple of 8 codes (whole dwords, so
// that no dword straddles two groups). Both parts in one zero-filled block.
void AllocateBytes(const Args& a, int64_t gsz, PackedWeights* p) {
  p->kb_dw = (p->kb + 31) / 32;
  const int64_t groups = p->groups;
  p->group_dw.assign(static_cast<size_t>(groups + 1), 0);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t cnt = std::min(a.s, (g + 1) * gsz) - g * gsz;
    p->group_dw[g + 1] = p->group_dw[g] + (cnt + kNibbles - 1) / kNibbles;
  }
  p->s_dw = p->group_dw[groups];
  const int64_t wb_bytes = p->nblk * p->kb_dw * kBlockLine;
  p->wb = p->bytes.Allocate(static_cast<size_t>(wb_bytes + p->nblk * p->s_dw * kBlockLine));
  p->ws = p->wb + wb_bytes;
}

// Binary signs: the bytes of layout 1 unchanged, 4 per dword (BlockOffset, LineByte).
void PackSigns(const Args& a, PackedWeights* p, bool release) {
  const int64_t kbb = (p->kb + 7) / 8;
  RowReleaser sign_release(release, a.sign_packed, kbb, a.n);
  for (int64_t row = 0; row < a.n; ++row) {
    const uint8_t* src = a.sign_packed + row * kbb;
    uint8_t* dst = p->wb + BlockOffset(row / kRowBlock, p->kb_dw);
    const int64_t line = GroupLine(row / kRowBlock, p->nblk), r = row % kRowBlock;
    for (int64_t b = 0; b < kbb; ++b) dst[(b / 4) * line + LineByte(r, b % 4, p->byte_major)] = src[b];
    sign_release.Done(row);
  }
}

// Salient codes: the nibbles of layout 1, moved to their padded slots.
void PackCodes(const Args& a, int64_t gsz, PackedWeights* p, bool release) {
  p->slot_chan.assign(static_cast<size_t>(kNibbles * p->s_dw), -1);
  p->slot_of.resize(static_cast<size_t>(a.s));
  for (int64_t j = 0; j < a.s; ++j) {
    const int64_t g = j / gsz;
    p->slot_of[j] = static_cast<int32_t>(kNibbles * p->group_dw[g] + (j - g * gsz));
    p->slot_chan[p->slot_of[j]] = a.salient_idx[j];
    p->slots_dense = p->slots_dense && p->slot_of[j] == j;
  }
  const int64_t sal_bytes = (a.s + 1) / 2;
  RowReleaser code_release(release, a.salient_packed, sal_bytes, a.n);
  for (int64_t row = 0; row < a.n; ++row) {
    const uint8_t* src = a.salient_packed + row * sal_bytes;
    uint8_t* dst = p->ws + BlockOffset(row / kRowBlock, p->s_dw);
    const int64_t line = GroupLine(row / kRowBlock, p->nblk), r = row % kRowBlock;
    for (int64_t j = 0; j < a.s; ++j) {
      const int q = (src[j >> 1] >> ((j & 1) * 4)) & 0xf;
      const int64_t slot = p->slot_of[j], nib = slot % kNibbles;
      dst[(slot / kNibbles) * line + LineByte(r, nib / 2, p->byte_major)] |=
          static_cast<uint8_t>(q << ((nib & 1) * 4));
    }
    code_release.Done(row);
  }
}

// Per-group scales and scale * zero as [group][npad] rows.
void PackGroupScales(const Args& a, PackedWeights* p) {
  const int64_t groups = p->groups, npad = p->npad;
  p->sscale.assign(static_cast<size_t>(groups * npad), 0.0f);
  p->szero.assign(static_cast<size_t>(groups * npad), 0.0f);
  for (int64_t row = 0; row < a.n; ++row) {
    for (int64_t g = 0; g < groups; ++g) {
      const uint16_t h = a.salient_scale[row * groups + g];
      p->finite = p->finite && HalfIsFinite(h);
      const float scale = HalfToFloat(h);
      const int zero = a.salient_zero[row * groups + g];
      p->sscale[g * npad + row] = scale;
      p->szero[g * npad + row] = scale * static_cast<float>(zero);
      p->has_zero = p->has_zero || zero != 0;
    }
  }
}

// The small inputs, all copied by now.
void ReleaseParameters(const Args& a, const PackedWeights& p) {
  const int64_t n = a.n, groups = p.groups;
  ReleasePages(a.row_scale, static_cast<size_t>(n) * 2);
  ReleasePages(a.row_offset, static_cast<size_t>(n) * 2);
  ReleasePages(a.salient_idx, static_cast<size_t>(a.s) * 4);
  ReleasePages(a.salient_scale, static_cast<size_t>(n * groups) * 2);
  ReleasePages(a.salient_zero, static_cast<size_t>(n * groups));
  if (a.r2) ReleasePages(a.r2, static_cast<size_t>(p.kb) * 2);
  if (a.bias) ReleasePages(a.bias, static_cast<size_t>(n) * 4);
}

Status Pack(const Args& a, PackedWeights* p, bool release, bool byte_major) {
  Status st = CheckSizes(a);
  if (!st) return st;
  const bool have_binary = a.k > a.s, have_salient = a.s > 0;
  if (!a.row_scale || !a.row_offset || (have_binary && !a.sign_packed) ||
      (have_salient && (!a.salient_idx || !a.salient_packed || !a.salient_scale ||
                        !a.salient_zero)))
    return Status::Error("a required weight pointer is null");
  if (!(st = PackChannels(a, p))) return st;
  p->byte_major = byte_major;
  const int64_t gsz = a.group_size > 0 ? a.group_size : a.s;
  PackRowParameters(a, p);
  AllocateBytes(a, gsz, p);
  PackSigns(a, p, release);
  PackCodes(a, gsz, p, release);
  PackGroupScales(a, p);
  if (release) ReleaseParameters(a, *p);
  return Status::Ok();
}

}  // namespace

Status PackWeights(const Args& a, PackedPtr* out, bool release_source, Isa isa) noexcept {
  try {
    const CpuKernels* kern = KernelsFor(isa);
    if (!kern)
      return Status::Error(std::string("CPU path ") + IsaName(isa) + " is not available here");
    auto p = std::make_shared<PackedWeights>();
    Status st = Pack(a, p.get(), release_source, kern->byte_major);
    if (!st) return st;
    *out = std::move(p);
    return Status::Ok();
  } catch (...) {
    return Status::Error(ExceptionMessage());
  }
}

}  // namespace bml
}  // namespace qexport
