/*
 * StructKV selection arithmetic shared by the plugin's shape inference and enqueue.
 *
 * Budgets are ceil(R * N) in exact integers, as structkv.selection.budget computes them in
 * Python: R becomes the fraction Python's Fraction(R).limit_denominator(1_000_000) gives, so
 * 0.1 * 30 is 3 (not 4 from 3.0000000000000004). Host-only: no TensorRT or CUDA types, so the
 * unit test checks it against the Python function directly.
 */
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace structkv
{

//! A budget ratio as an exact fraction num / den (0 < num <= den).
struct Ratio
{
    int64_t num{1};
    int64_t den{5};
};

//! Python's Fraction(x).limit_denominator(maxDen) for a finite double x in (0, 1]: the closest
//! fraction with a denominator at most maxDen (ties to the larger denominator's bound, as
//! CPython 3.11's implementation compares distances).
inline Ratio limitDenominator(double x, int64_t maxDen = 1000000)
{
    if (!(x > 0.0) || !(x <= 1.0) || !std::isfinite(x))
    {
        throw std::invalid_argument("ratio must be in (0, 1], got " + std::to_string(x));
    }
    // x = mant / 2^exp exactly (mant a 53-bit integer).
    int e = 0;
    double frac = std::frexp(x, &e); // x = frac * 2^e, frac in [0.5, 1)
    __int128 n = static_cast<__int128>(std::ldexp(frac, 53));
    int shift = 53 - e;
    if (shift > 120)
    {
        throw std::invalid_argument("ratio too small: " + std::to_string(x));
    }
    __int128 d = static_cast<__int128>(1) << shift;
    while ((n & 1) == 0 && d > 1)
    {
        n >>= 1;
        d >>= 1;
    }
    if (d <= maxDen)
    {
        return {static_cast<int64_t>(n), static_cast<int64_t>(d)};
    }
    __int128 const n0 = n;
    __int128 const d0 = d;
    __int128 p0 = 0, q0 = 1, p1 = 1, q1 = 0;
    while (true)
    {
        __int128 a = n / d;
        __int128 q2 = q0 + a * q1;
        if (q2 > maxDen)
        {
            break;
        }
        __int128 p2 = p0 + a * p1;
        p0 = p1;
        q0 = q1;
        p1 = p2;
        q1 = q2;
        __int128 r = n - a * d;
        n = d;
        d = r;
    }
    __int128 k = (maxDen - q0) / q1;
    __int128 bp = p0 + k * p1; // bound1 = bp / bq
    __int128 bq = q0 + k * q1;
    // |p1/q1 - n0/d0| <= |bp/bq - n0/d0|  <=>  |p1*d0 - n0*q1| * bq <= |bp*d0 - n0*bq| * q1
    auto absv = [](__int128 v) { return v < 0 ? -v : v; };
    __int128 lhs = absv(p1 * d0 - n0 * q1) * bq;
    __int128 rhs = absv(bp * d0 - n0 * bq) * q1;
    if (lhs <= rhs)
    {
        return {static_cast<int64_t>(p1), static_cast<int64_t>(q1)};
    }
    return {static_cast<int64_t>(bp), static_cast<int64_t>(bq)};
}

//! ceil(R * n) in integers.
inline int64_t budget(Ratio r, int64_t n)
{
    return (r.num * n + r.den - 1) / r.den;
}

//! Tokens kept of a row of n scores: min(ceil(R * N), n - window) + window, N the prompt length
//! the budget is a fraction of (N = n for the structural compaction).
inline int64_t keptCount(Ratio r, int64_t promptLen, int64_t n, int64_t window)
{
    return std::min(budget(r, promptLen), n - window) + window;
}

//! Chunk mode (span-preserving selection, chunk > 1): the n - window candidates are cut into
//! `whole` chunks of `chunk` tokens from the start; the `keep` best chunks are kept whole, and
//! the remainder between the last whole chunk and the window is always kept, so a row keeps
//! `count` tokens. As structkv.selection.selected_count: keep = min(whole, max(1,
//! max(ceil(R * N) - remainder, 0) / chunk)); no whole chunk keeps everything.
struct ChunkPlan
{
    int64_t whole{0};
    int64_t keep{0};
    int64_t count{0};
};

inline ChunkPlan chunkPlan(Ratio r, int64_t promptLen, int64_t n, int64_t window, int64_t chunk)
{
    int64_t const candidates = n - window;
    int64_t const whole = candidates / chunk;
    int64_t const rest = candidates - whole * chunk;
    int64_t const over = std::max<int64_t>(budget(r, promptLen) - rest, 0);
    int64_t const keep = std::min(whole, std::max<int64_t>(1, over / chunk));
    return {whole, keep, keep * chunk + n - whole * chunk};
}

//! Tokens a row keeps in either mode (chunk 0 or 1: single tokens).
inline int64_t selectedCount(Ratio r, int64_t promptLen, int64_t n, int64_t window, int64_t chunk)
{
    return chunk > 1 ? chunkPlan(r, promptLen, n, window, chunk).count : keptCount(r, promptLen, n, window);
}

} // namespace structkv
