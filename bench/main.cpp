// wick-bench: performance measurements of wick that print JSON lines.
//
//   wick-bench trainer --threads 1            # Trainer vs a raw LibTorch loop vs PyTorch eager
//   wick-bench --jsonl results.jsonl trainer  # also append the lines to a file
//   wick-bench ddp                            # 2 ranks x 1 thread vs 1 rank: DDP weak scaling
//   wick-bench quant                          # int8 quantize_dynamic vs fp32 vs Python's
//   wick-bench pipeline                       # bubble vs theory, GPipe vs 1F1B, checkpoint memory
//   wick-bench gpt                            # wick-gpt's training step and generation vs PyTorch
//   wick-bench profiler                       # wick::Profiler's cost: off vs wait vs recording
//   wick-bench batcher --threads 2            # 64 clients: dynamic batching vs none vs batches
//   wick-bench export                         # AOTInductor .pt2 in wick vs torch::nn vs Python
//   wick-bench safetensors                    # a 512 MiB safetensors file: wick vs Python
//   wick-bench checkpoint                     # async checkpoint's blocked time vs a sync save
//   wick-bench shard                          # ZeRO-1/2, full sharding vs Python ZeRO, FSDP2
//
// Each subcommand lives in its own file (trainer_bench.cpp, ...) and adds
// itself through an add_<name>_command function declared in bench_common.h.

#include "bench_common.h"

#include <c10/util/Exception.h>
#include <CLI/CLI.hpp>

#include <iostream>
#include <memory>

int main(int argc, char** argv) {
  CLI::App app{"wick-bench: performance measurements of wick, printed as JSON lines"};
  auto global = std::make_shared<wick_bench::GlobalOptions>();
  app.add_option("--python", global->python,
                 "Python that runs the peers (default: $WICK_PYTHON, else " WICK_BENCH_PYTHON ")");
  app.add_option("--peers-dir", global->peers_dir,
                 "folder of the Python peer scripts (default: $WICK_BENCH_PEERS_DIR, "
                 "else " WICK_BENCH_PEERS_DIR ")");
  app.add_option("--jsonl", global->jsonl, "also append every JSON line to this file");
  app.require_subcommand(1);
  app.fallthrough();  // global options may also follow the subcommand

  wick_bench::add_trainer_command(app, global);
  wick_bench::add_ddp_command(app, global);
  wick_bench::add_quant_command(app, global);
  wick_bench::add_pipeline_command(app, global);
  wick_bench::add_profiler_command(app, global);
#ifdef WICK_BENCH_WITH_GPT
  wick_bench::add_gpt_command(app, global);
#endif
  wick_bench::add_batcher_command(app, global);
  wick_bench::add_safetensors_command(app, global);
  wick_bench::add_export_command(app, global);
  wick_bench::add_checkpoint_command(app, global);
  wick_bench::add_shard_command(app, global);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const c10::Error& e) {
    std::cerr << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "wick-bench: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
