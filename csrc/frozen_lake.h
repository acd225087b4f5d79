// Frozen Lake dynamics and context-token emission: the single source of truth for the C++ CPU loop and the CUDA
// kernel (every function is __host__ __device__ under nvcc). It mirrors icrl_fast/envs/frozen_lake.py line for
// line, random numbers included: env i draws from SplitMix64 stream (seed, i) exactly as icrl_fast/envs/rng.py,
// so the extension and the Numba simulator produce identical trajectories for one seed (tested). The stream is
// counter-based: draw k of env i is mix64(stream_state(seed, i) + (k + 1) * GOLDEN), a pure function of
// (seed, env, counter); its state is that one uint64.
//
// No torch headers here: this file compiles with g++ alone and with nvcc alone.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define ICRL_HD __host__ __device__ __forceinline__
#else
#define ICRL_HD inline
#endif

namespace icrl {

// Tile codes (icrl_fast.envs.maps) and autoreset modes (icrl_fast.envs.frozen_lake).
constexpr uint8_t FROZEN = 0, START = 1, HOLE = 2, GOAL = 3;
constexpr int64_t NEXT_STEP = 0, SAME_STEP = 1, DISABLED = 2;
constexpr uint64_t GOLDEN = 0x9E3779B97F4A7C15ull;

ICRL_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

ICRL_HD uint64_t stream_state(uint64_t seed, uint64_t stream_id) {
  return mix64(mix64(seed) ^ (stream_id * GOLDEN + GOLDEN));
}

// Advance the stream; a uniform double on [0, 1) with 53 random bits.
ICRL_HD double next_uniform(uint64_t& state) {
  state += GOLDEN;
  return static_cast<double>(mix64(state) >> 11) * (1.0 / 9007199254740992.0);
}

// gymnasium's categorical draw over [(a - 1) % 4, a, (a + 1) % 4] with probabilities [fail, success, fail].
ICRL_HD int slip_branch(double u, bool slippery, double success_rate) {
  if (!slippery) return 1;
  const double fail = (1.0 - success_rate) / 2.0;
  const double c1 = fail + success_rate;
  if (fail > u) return 0;
  if (c1 > u) return 1;
  if (c1 + fail > u) return 2;
  return 0;
}

// The structure-of-arrays batch, as raw pointers (host or device memory alike).
struct Batch {
  const uint8_t* tiles;    // [B, R, C]
  const int32_t* nrow;     // [B]
  const int32_t* ncol;     // [B]
  const int32_t* starts;   // [B, K] observations of the S tiles, row-major
  const int32_t* n_starts; // [B]
  int64_t R, C, K;
  int32_t* pos;            // [4, B]: row, col, elapsed steps, reset pending (NEXT_STEP)
  uint64_t* rng;           // [B]
  int64_t B;
};

struct Dynamics {
  bool slippery;
  double success_rate;
  double reward_of_tile[4];  // indexed by FROZEN, START, HOLE, GOAL
  int64_t max_steps;         // 0: no limit
  int64_t mode;              // NEXT_STEP, SAME_STEP or DISABLED
};

struct StepOut {
  int64_t* obs;
  double* reward;
  bool* terminated;
  bool* truncated;
  int64_t* final_obs;
};

ICRL_HD int64_t reset_one(const Batch& b, int64_t i) {
  const double u = next_uniform(b.rng[i]);
  const int32_t n = b.n_starts[i];
  int64_t slot = static_cast<int64_t>(u * n);
  if (slot > n - 1) slot = n - 1;
  const int32_t s = b.starts[i * b.K + slot];
  const int32_t w = b.ncol[i];
  const int32_t r = s / w;
  b.pos[i] = r;
  b.pos[b.B + i] = s - r * w;
  b.pos[2 * b.B + i] = 0;
  b.pos[3 * b.B + i] = 0;
  return s;
}

ICRL_HD void step_one(const Batch& b, const Dynamics& d, int64_t i, int64_t a, const StepOut& o) {
  if (d.mode == NEXT_STEP && b.pos[3 * b.B + i] != 0) {
    o.obs[i] = reset_one(b, i);
    o.reward[i] = 0.0;
    o.terminated[i] = false;
    o.truncated[i] = false;
    o.final_obs[i] = -1;
    return;
  }
  int branch = 1;
  if (d.slippery) branch = slip_branch(next_uniform(b.rng[i]), true, d.success_rate);
  int32_t r = b.pos[i], c = b.pos[b.B + i];
  const int32_t nr = b.nrow[i], nc = b.ncol[i];
  const uint8_t* t = b.tiles + i * b.R * b.C;
  const uint8_t here = t[r * b.C + c];
  const bool from_terminal = here == GOAL || here == HOLE;
  uint8_t tile = here;
  if (!from_terminal) {
    const int dir = static_cast<int>((a + branch + 3) & 3);  // left, down, right, up
    const int dr[4] = {0, 1, 0, -1}, dc[4] = {-1, 0, 1, 0};
    r = r + dr[dir];
    c = c + dc[dir];
    r = r < 0 ? 0 : (r > nr - 1 ? nr - 1 : r);
    c = c < 0 ? 0 : (c > nc - 1 ? nc - 1 : c);
    tile = t[r * b.C + c];
  }
  const int32_t elapsed = b.pos[2 * b.B + i] + 1;
  const double reward = from_terminal ? 0.0 : d.reward_of_tile[tile];
  const bool done = from_terminal || tile == GOAL || tile == HOLE;
  const bool cut = d.max_steps > 0 && elapsed >= d.max_steps;
  o.reward[i] = reward;
  o.terminated[i] = done;
  o.truncated[i] = cut;
  const int64_t s = static_cast<int64_t>(r) * nc + c;
  o.final_obs[i] = -1;
  if (done || cut) {
    if (d.mode == SAME_STEP) {
      o.final_obs[i] = s;
      o.obs[i] = reset_one(b, i);
      return;
    }
    if (d.mode == NEXT_STEP) b.pos[3 * b.B + i] = 1;
  }
  b.pos[i] = r;
  b.pos[b.B + i] = c;
  b.pos[2 * b.B + i] = elapsed;
  o.obs[i] = s;
}

// A context format's token runs (icrl_fast.data.formats.ContextFormat), concatenated into one table:
// run k occupies table[off[k] : off[k + 1]].
enum Run { EPISODE_START = 0, PRE_OBS, POST_OBS, POST_ACTION, REWARD_BLOCK, TRUNC_BLOCK, EPISODE_END, NUM_RUNS };

struct Format {
  const int64_t* runs;      // concatenated runs
  const int64_t* run_off;   // [NUM_RUNS + 1]
  const int64_t* obs_table; // [max_obs, obs_width]
  const int64_t* obs_len;   // [max_obs]
  const int64_t* action_ids;// [4]
  int64_t obs_width;
};

template <typename Sink>
ICRL_HD void put_run(const Format& f, int run, Sink& sink) {
  for (int64_t k = f.run_off[run]; k < f.run_off[run + 1]; ++k) sink(f.runs[k]);
}

// The tokens a context gains after acting `action` (icrl_fast.rl.rollout.ContextStreams.after_action): the action,
// its post-action run, a reward block if the reward is non-zero, and when the episode ended the truncation block
// (cut without landing on G or H), the episode end and the next episode's start; then the next observation's
// step block up to the decision point. With first=true only the first block of a context (episode start + step).
template <typename Sink>
ICRL_HD void emit(const Format& f, bool first, int64_t action, double reward, bool terminated, bool truncated,
                  int64_t next_obs, Sink& sink) {
  if (!first) {
    sink(f.action_ids[action]);
    put_run(f, POST_ACTION, sink);
    if (reward != 0.0) put_run(f, REWARD_BLOCK, sink);
    if (terminated || truncated) {
      if (truncated && !terminated) put_run(f, TRUNC_BLOCK, sink);
      put_run(f, EPISODE_END, sink);
    }
  }
  if (first || terminated || truncated) put_run(f, EPISODE_START, sink);
  put_run(f, PRE_OBS, sink);
  for (int64_t k = 0; k < f.obs_len[next_obs]; ++k) sink(f.obs_table[next_obs * f.obs_width + k]);
  put_run(f, POST_OBS, sink);
}

struct Counter {
  int64_t n = 0;
  ICRL_HD void operator()(int64_t) { ++n; }
};

// Writes tokens right-aligned into row[width - count : width] (left padding: the decision token lands last).
struct RightAligned {
  int64_t* row;
  int64_t at;
  ICRL_HD void operator()(int64_t tok) { row[at++] = tok; }
};

// Emit env i's block into out[i, :] right-aligned, padding the rest with `pad`; returns the token count, or -1 if
// the block does not fit in `width`.
ICRL_HD int64_t emit_row(const Format& f, bool first, int64_t action, double reward, bool terminated, bool truncated,
                         int64_t next_obs, int64_t* row, int64_t width, int64_t pad) {
  Counter count;
  emit(f, first, action, reward, terminated, truncated, next_obs, count);
  if (count.n > width) return -1;
  for (int64_t k = 0; k < width - count.n; ++k) row[k] = pad;
  RightAligned sink{row, width - count.n};
  emit(f, first, action, reward, terminated, truncated, next_obs, sink);
  return count.n;
}

}  // namespace icrl
