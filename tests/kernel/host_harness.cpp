// Runs the GPU kernels' code on the CPU, for tests/integration/gpu_kernel.rs (no GPU needed).
//   host_harness DATA JOBS RUNS OUT_CVS OUT_STAGED
// DATA: bytes; JOBS: lines "start len offset block_size" (start: offset in DATA); RUNS: lines
// "start len dst"; OUT_CVS: 32 bytes per block of every job, in order; OUT_STAGED: the gather's
// staging buffer (as large as the runs' extent).
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../../src/live/blake3.cu"

static std::vector<u8> slurp(const char* path) {
    std::vector<u8> v;
    FILE* f = std::fopen(path, "rb");
    if (!f) std::exit(2);
    int c;
    while ((c = std::fgetc(f)) != EOF) v.push_back((u8)c);
    std::fclose(f);
    return v;
}

int main(int argc, char** argv) {
    if (argc != 6) return 2;
    std::vector<u8> data = slurp(argv[1]);
    std::vector<Job> jobs;
    FILE* jf = std::fopen(argv[2], "r");
    unsigned long long a, b, c, d;
    u64 total = 0;
    while (jf && std::fscanf(jf, "%llu %llu %llu %llu", &a, &b, &c, &d) == 4) {
        Job j = {(u64)(data.data() + a), b, c, total, d};
        jobs.push_back(j);
        total += (b + d - 1) / d;
    }
    std::vector<u32> out(total * 8);
    apollo_block_cvs(jobs.data(), (u32)jobs.size(), total, out.data());
    FILE* o = std::fopen(argv[4], "wb");
    std::fwrite(out.data(), 4, out.size(), o);
    std::fclose(o);
    std::vector<Run> runs;
    u64 extent = 0;
    FILE* rf = std::fopen(argv[3], "r");
    while (rf && std::fscanf(rf, "%llu %llu %llu", &a, &b, &c) == 3) {
        Run r = {(u64)(data.data() + a), b, c};
        runs.push_back(r);
        if (c + b > extent) extent = c + b;
    }
    std::vector<u8> staged(extent);
    apollo_gather(runs.data(), (u32)runs.size(), staged.data());
    FILE* s = std::fopen(argv[5], "wb");
    std::fwrite(staged.data(), 1, staged.size(), s);
    std::fclose(s);
    return 0;
}
