// A minimal fork-join over rows with std::thread (no OpenMP: wheels must not depend on a runtime,
// and torch's own pool is not reachable without the torch C++ API).
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <utility>
#include <vector>

namespace fastgen {

// Below this many elements per worker, starting a thread (~20-50 us) costs more than it saves.
constexpr int64_t kMinWorkPerThread = int64_t{1} << 16;

// Runs fn(begin, end) over [0, rows) in contiguous chunks, one per worker; the calling thread takes
// the first chunk. A thread that cannot be started has its chunk run by the caller instead.
// fn must not throw.
template <typename Fn>
void parallel_rows(int64_t rows, int64_t work_per_row, int threads, const Fn& fn) {
    if (rows <= 0) return;
    int64_t n = std::max<int64_t>(1, threads);
    n = std::min<int64_t>(n, rows);
    n = std::min<int64_t>(n, std::max<int64_t>(1, rows * work_per_row / kMinWorkPerThread));
    if (n == 1) {
        fn(int64_t{0}, rows);
        return;
    }
    std::vector<std::thread> workers;
    workers.reserve(static_cast<size_t>(n - 1));
    std::vector<std::pair<int64_t, int64_t>> leftover;
    for (int64_t i = 1; i < n; ++i) {
        const int64_t begin = rows * i / n, end = rows * (i + 1) / n;
        try {
            workers.emplace_back([&fn, begin, end] { fn(begin, end); });
        } catch (const std::exception&) {  // out of threads (std::system_error): do it here
            leftover.emplace_back(begin, end);
        }
    }
    fn(int64_t{0}, rows / n);
    for (const auto& chunk : leftover) fn(chunk.first, chunk.second);
    for (auto& t : workers) t.join();
}

}  // namespace fastgen
