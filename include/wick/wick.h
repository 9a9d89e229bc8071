#pragma once
// wick: everything. Include single headers to compile less.
#include <wick/amp.h>
#include <wick/async_checkpoint.h>
#include <wick/batcher.h>
#include <wick/callbacks.h>
#include <wick/checkpoint.h>
#include <wick/data.h>
#include <wick/ddp.h>
#include <wick/distributed.h>
#include <wick/grad_accumulator.h>
#include <wick/hash.h>
#include <wick/inference.h>
#include <wick/lr_scheduler.h>
#include <wick/meters.h>
#include <wick/optim.h>
#include <wick/pipeline.h>
#include <wick/profiler.h>
#include <wick/pruner.h>
#include <wick/quantizer.h>
#include <wick/report.h>
#include <wick/safetensors.h>
#include <wick/shard.h>
#include <wick/tensorboard.h>
#include <wick/trainer.h>
#include <wick/version.h>

namespace wick {
/// The library's version string, e.g. "0.1.0".
const char* version();
}  // namespace wick
