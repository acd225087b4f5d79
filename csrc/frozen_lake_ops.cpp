// Torch bindings of the batched Frozen Lake (namespace `icrl`): schemas, input checks and the CPU implementation.
// The CUDA implementation (same header, one thread per env) is registered here too when built with
// ICRL_WITH_CUDA; its kernels live in frozen_lake_cuda.cu. Fake (meta) implementations are registered from
// Python (icrl_fast/envs/ext.py) so torch.compile and CUDA graphs can trace a rollout step.
//
// All ops mutate preallocated buffers and return nothing: a rollout step allocates no memory.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>

#include "frozen_lake.h"

#ifdef ICRL_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
namespace icrl {  // each returns cudaGetLastError() after its launch (frozen_lake_cuda.cu), checked by C10_CUDA_CHECK
cudaError_t launch_step(const Batch&, const Dynamics&, const int64_t*, const StepOut&, cudaStream_t);
cudaError_t launch_reset(const Batch&, const bool*, const StepOut&, cudaStream_t);
cudaError_t launch_seed(uint64_t, const bool*, uint64_t*, int64_t, cudaStream_t);
cudaError_t launch_emit(const Format&, const int64_t*, const StepOut&, const bool*, int64_t, int64_t*, int64_t,
                        int64_t*, int64_t, cudaStream_t);
}  // namespace icrl
#endif

namespace {

using at::Tensor;

// Error messages stream strings only: numbers, shapes, devices and dtypes are formatted here first. On the lent
// H200 (2026-11-30) the JIT build used the image's newer g++ (/opt/gcc) while Python had loaded an older
// libstdc++, and streaming an integer into a TORCH_CHECK message (basic_ostream::_M_insert<long>, instantiated in
// this library from the newer headers) segfaulted instead of raising. std::to_string needs no stream, and string
// insertion resolves to the loaded libstdc++. tests/envs/test_ext.py keeps every message to these helpers.
std::string num(int64_t v) { return std::to_string(v); }
std::string num(double v) { return std::to_string(v); }
std::string shape(at::IntArrayRef s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}
std::string dev(const at::Device& d) { return d.str(); }
const char* type(at::ScalarType t) { return c10::toString(t); }

void check(const Tensor& t, const char* name, at::ScalarType dtype, int64_t dim, const Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), "icrl: ", name, " must be on ", dev(like.device()),
              " like the other inputs, got ", dev(t.device()));
  TORCH_CHECK(t.scalar_type() == dtype, "icrl: ", name, " must be ", type(dtype), ", got ", type(t.scalar_type()));
  TORCH_CHECK(t.dim() == dim, "icrl: ", name, " must have ", num(dim), " dimensions, got shape ", shape(t.sizes()));
  TORCH_CHECK(t.is_contiguous(), "icrl: ", name, " must be contiguous");
}

void check_len(const Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.size(0) == n, "icrl: ", name, " must have ", num(n), " rows (one per env), got shape ",
              shape(t.sizes()));
}

icrl::Batch batch(const Tensor& tiles, const Tensor& nrow, const Tensor& ncol, const Tensor& starts,
                  const Tensor& n_starts, Tensor& pos, Tensor& rng) {
  check(tiles, "tiles", at::kByte, 3, tiles);
  const int64_t B = tiles.size(0);
  check(nrow, "nrow", at::kInt, 1, tiles);
  check(ncol, "ncol", at::kInt, 1, tiles);
  check(starts, "starts", at::kInt, 2, tiles);
  check(n_starts, "n_starts", at::kInt, 1, tiles);
  check(pos, "pos", at::kInt, 2, tiles);
  check(rng, "rng", at::kLong, 1, tiles);
  for (auto [t, name] : {std::pair{&nrow, "nrow"}, {&ncol, "ncol"}, {&starts, "starts"}, {&n_starts, "n_starts"},
                         {&rng, "rng"}})
    check_len(*t, name, B);
  TORCH_CHECK(pos.size(0) == 4 && pos.size(1) == B, "icrl: pos must be [4, ", num(B), "], got ", shape(pos.sizes()));
  return {tiles.data_ptr<uint8_t>(), nrow.data_ptr<int32_t>(), ncol.data_ptr<int32_t>(), starts.data_ptr<int32_t>(),
          n_starts.data_ptr<int32_t>(), tiles.size(1), tiles.size(2), starts.size(1), pos.data_ptr<int32_t>(),
          reinterpret_cast<uint64_t*>(rng.data_ptr<int64_t>()), B};
}

icrl::StepOut outputs(Tensor& obs, Tensor& reward, Tensor& terminated, Tensor& truncated, Tensor& final_obs,
                      const Tensor& like) {
  const int64_t B = like.size(0);
  check(obs, "obs", at::kLong, 1, like);
  check(reward, "reward", at::kDouble, 1, like);
  check(terminated, "terminated", at::kBool, 1, like);
  check(truncated, "truncated", at::kBool, 1, like);
  check(final_obs, "final_obs", at::kLong, 1, like);
  for (auto [t, name] : {std::pair{&obs, "obs"}, {&reward, "reward"}, {&terminated, "terminated"},
                         {&truncated, "truncated"}, {&final_obs, "final_obs"}})
    check_len(*t, name, B);
  return {obs.data_ptr<int64_t>(), reward.data_ptr<double>(), terminated.data_ptr<bool>(),
          truncated.data_ptr<bool>(), final_obs.data_ptr<int64_t>()};
}

icrl::Dynamics dynamics(bool slippery, double success_rate, at::ArrayRef<double> rewards, int64_t max_steps,
                        int64_t mode) {
  TORCH_CHECK(rewards.size() == 3, "icrl: rewards must be (goal, hole, other), got ",
              num(static_cast<int64_t>(rewards.size())), " numbers");
  TORCH_CHECK(success_rate >= 0.0 && success_rate <= 1.0, "icrl: success_rate must be in [0, 1], got ",
              num(success_rate));
  TORCH_CHECK(mode >= icrl::NEXT_STEP && mode <= icrl::DISABLED, "icrl: mode must be 0 (next step), 1 (same step) "
              "or 2 (disabled), got ", num(mode));
  TORCH_CHECK(max_steps >= 0, "icrl: max_steps must be >= 0 (0: no limit), got ", num(max_steps));
  return {slippery, success_rate, {rewards[2], rewards[2], rewards[1], rewards[0]}, max_steps, mode};
}

void step(const Tensor& actions, const Tensor& tiles, const Tensor& nrow, const Tensor& ncol, const Tensor& starts,
          const Tensor& n_starts, Tensor pos, Tensor rng, bool slippery, double success_rate,
          at::ArrayRef<double> rewards, int64_t max_steps, int64_t mode, Tensor obs, Tensor reward,
          Tensor terminated, Tensor truncated, Tensor final_obs) {
  icrl::Batch b = batch(tiles, nrow, ncol, starts, n_starts, pos, rng);
  check(actions, "actions", at::kLong, 1, tiles);
  check_len(actions, "actions", b.B);
  icrl::StepOut o = outputs(obs, reward, terminated, truncated, final_obs, tiles);
  icrl::Dynamics d = dynamics(slippery, success_rate, rewards, max_steps, mode);
  const int64_t* a = actions.data_ptr<int64_t>();
#ifdef ICRL_WITH_CUDA
  if (tiles.is_cuda()) {  // action values are not validated on the GPU (that would need a device sync)
    const c10::cuda::CUDAGuard guard(tiles.device());
    C10_CUDA_CHECK(icrl::launch_step(b, d, a, o, c10::cuda::getCurrentCUDAStream()));
    return;
  }
#endif
  TORCH_CHECK(tiles.device().is_cpu(), "icrl: this build has no CUDA support; inputs are on ", dev(tiles.device()));
  for (int64_t i = 0; i < b.B; ++i)
    TORCH_CHECK(a[i] >= 0 && a[i] <= 3, "icrl: actions must be in 0..3 (left, down, right, up); env ", num(i),
                " got ", num(a[i]));
  at::parallel_for(0, b.B, 2048, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) icrl::step_one(b, d, i, a[i], o);
  });
}

void reset(const Tensor& mask, const Tensor& tiles, const Tensor& nrow, const Tensor& ncol, const Tensor& starts,
           const Tensor& n_starts, Tensor pos, Tensor rng, Tensor obs, Tensor reward, Tensor terminated,
           Tensor truncated, Tensor final_obs) {
  icrl::Batch b = batch(tiles, nrow, ncol, starts, n_starts, pos, rng);
  check(mask, "mask", at::kBool, 1, tiles);
  check_len(mask, "mask", b.B);
  icrl::StepOut o = outputs(obs, reward, terminated, truncated, final_obs, tiles);
  const bool* m = mask.data_ptr<bool>();
#ifdef ICRL_WITH_CUDA
  if (tiles.is_cuda()) {
    const c10::cuda::CUDAGuard guard(tiles.device());
    C10_CUDA_CHECK(icrl::launch_reset(b, m, o, c10::cuda::getCurrentCUDAStream()));
    return;
  }
#endif
  TORCH_CHECK(tiles.device().is_cpu(), "icrl: this build has no CUDA support; inputs are on ", dev(tiles.device()));
  for (int64_t i = 0; i < b.B; ++i) {
    if (!m[i]) continue;
    o.obs[i] = icrl::reset_one(b, i);
    o.reward[i] = 0.0;
    o.terminated[i] = o.truncated[i] = false;
    o.final_obs[i] = -1;
  }
}

void seed_streams(int64_t seed, const Tensor& mask, Tensor rng) {
  check(rng, "rng", at::kLong, 1, rng);
  check(mask, "mask", at::kBool, 1, rng);
  check_len(mask, "mask", rng.size(0));
  auto* r = reinterpret_cast<uint64_t*>(rng.data_ptr<int64_t>());
  const bool* m = mask.data_ptr<bool>();
#ifdef ICRL_WITH_CUDA
  if (rng.is_cuda()) {
    const c10::cuda::CUDAGuard guard(rng.device());
    C10_CUDA_CHECK(
        icrl::launch_seed(static_cast<uint64_t>(seed), m, r, rng.size(0), c10::cuda::getCurrentCUDAStream()));
    return;
  }
#endif
  TORCH_CHECK(rng.device().is_cpu(), "icrl: this build has no CUDA support; inputs are on ", dev(rng.device()));
  for (int64_t i = 0; i < rng.size(0); ++i)
    if (m[i]) r[i] = icrl::stream_state(static_cast<uint64_t>(seed), static_cast<uint64_t>(i));
}

void emit(const Tensor& actions, const Tensor& obs, const Tensor& reward, const Tensor& terminated,
          const Tensor& truncated, const Tensor& first, const Tensor& runs, const Tensor& run_off,
          const Tensor& obs_table, const Tensor& obs_len, const Tensor& action_ids, int64_t pad, Tensor out,
          Tensor counts) {
  const int64_t B = obs.size(0);
  check(actions, "actions", at::kLong, 1, obs);
  check(first, "first", at::kBool, 1, obs);
  for (auto [t, name] : {std::pair{&actions, "actions"}, {&first, "first"}}) check_len(*t, name, B);
  check(runs, "runs", at::kLong, 1, obs);
  check(run_off, "run_off", at::kLong, 1, obs);
  TORCH_CHECK(run_off.size(0) == icrl::NUM_RUNS + 1, "icrl: run_off must have ", num(int64_t{icrl::NUM_RUNS + 1}),
              " entries");
  check(obs_table, "obs_table", at::kLong, 2, obs);
  check(obs_len, "obs_len", at::kLong, 1, obs);
  check(action_ids, "action_ids", at::kLong, 1, obs);
  TORCH_CHECK(action_ids.size(0) == 4, "icrl: action_ids must hold the 4 action tokens");
  check(out, "out", at::kLong, 2, obs);
  check(counts, "counts", at::kLong, 1, obs);
  check_len(out, "out", B);
  check_len(counts, "counts", B);
  // the step outputs are read-only here; StepOut is reused for their pointers
  Tensor o_obs = obs, o_rew = reward, o_term = terminated, o_trunc = truncated, o_final = obs;
  icrl::StepOut o = outputs(o_obs, o_rew, o_term, o_trunc, o_final, obs);
  icrl::Format f{runs.data_ptr<int64_t>(), run_off.data_ptr<int64_t>(), obs_table.data_ptr<int64_t>(),
                 obs_len.data_ptr<int64_t>(), action_ids.data_ptr<int64_t>(), obs_table.size(1)};
  const int64_t W = out.size(1);
#ifdef ICRL_WITH_CUDA
  if (obs.is_cuda()) {
    const c10::cuda::CUDAGuard guard(obs.device());
    C10_CUDA_CHECK(icrl::launch_emit(f, actions.data_ptr<int64_t>(), o, first.data_ptr<bool>(), pad,
                                     out.data_ptr<int64_t>(), W, counts.data_ptr<int64_t>(), B,
                                     c10::cuda::getCurrentCUDAStream()));
    return;
  }
#endif
  TORCH_CHECK(obs.device().is_cpu(), "icrl: this build has no CUDA support; inputs are on ", dev(obs.device()));
  const int64_t* a = actions.data_ptr<int64_t>();
  const bool* fst = first.data_ptr<bool>();
  int64_t* cnt = counts.data_ptr<int64_t>();
  int64_t* rows = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 2048, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i)
      cnt[i] = icrl::emit_row(f, fst[i], a[i], o.reward[i], o.terminated[i], o.truncated[i], o.obs[i],
                              rows + i * W, W, pad);
  });
}

}  // namespace

TORCH_LIBRARY(icrl, m) {
  m.def("step(Tensor actions, Tensor tiles, Tensor nrow, Tensor ncol, Tensor starts, Tensor n_starts, "
        "Tensor(a!) pos, Tensor(b!) rng, bool slippery, float success_rate, float[] rewards, int max_steps, "
        "int autoreset, Tensor(c!) obs, Tensor(d!) reward, Tensor(e!) terminated, Tensor(f!) truncated, "
        "Tensor(g!) final_obs) -> ()");
  m.def("reset(Tensor mask, Tensor tiles, Tensor nrow, Tensor ncol, Tensor starts, Tensor n_starts, "
        "Tensor(a!) pos, Tensor(b!) rng, Tensor(c!) obs, Tensor(d!) reward, Tensor(e!) terminated, "
        "Tensor(f!) truncated, Tensor(g!) final_obs) -> ()");
  m.def("seed_streams(int seed, Tensor mask, Tensor(a!) rng) -> ()");
  m.def("emit(Tensor actions, Tensor obs, Tensor reward, Tensor terminated, Tensor truncated, Tensor first, "
        "Tensor runs, Tensor run_off, Tensor obs_table, Tensor obs_len, Tensor action_ids, int pad, "
        "Tensor(a!) out, Tensor(b!) counts) -> ()");
}

TORCH_LIBRARY_IMPL(icrl, CPU, m) {
  m.impl("step", &step);
  m.impl("reset", &reset);
  m.impl("seed_streams", &seed_streams);
  m.impl("emit", &emit);
}

#ifdef ICRL_WITH_CUDA
TORCH_LIBRARY_IMPL(icrl, CUDA, m) {
  m.impl("step", &step);
  m.impl("reset", &reset);
  m.impl("seed_streams", &seed_streams);
  m.impl("emit", &emit);
}
#endif
