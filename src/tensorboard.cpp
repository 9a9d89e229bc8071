#include "wick/tensorboard.h"

#include "format.h"  // first: it sets fmt's namespace
#include "fs.h"

#include <wick/amp.h>
#include <wick/distributed.h>
#include <wick/trainer.h>

#include <c10/util/Exception.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>

namespace wick {

// ---------------------------------------------------------------- CRC-32C

namespace {

std::array<uint32_t, 256> crc32c_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    table[i] = c;
  }
  return table;
}

// TFRecord's mask: a CRC of data that holds CRCs is itself easy to collide.
uint32_t masked_crc32c(const void* data, size_t size) {
  const uint32_t crc = crc32c(data, size);
  return ((crc >> 15) | (crc << 17)) + 0xa282ead8u;
}

// ---------------------------------------------------------------- protobuf

// The few protocol-buffer encodings an Event needs (proto3 wire format).
class Proto {
 public:
  Proto& varint(int field, uint64_t v) {
    key(field, 0);
    raw_varint(v);
    return *this;
  }
  Proto& fixed64_double(int field, double v) { return fixed<uint64_t>(field, 1, v); }
  Proto& fixed32_float(int field, float v) { return fixed<uint32_t>(field, 5, v); }
  Proto& bytes(int field, const std::string& b) {
    key(field, 2);
    raw_varint(b.size());
    out_ += b;
    return *this;
  }
  Proto& message(int field, const Proto& m) { return bytes(field, m.out_); }
  const std::string& str() const { return out_; }

 private:
  void key(int field, int wire_type) {
    raw_varint((static_cast<uint64_t>(field) << 3) | wire_type);
  }
  // A float's bits, little-endian, as wire types 1 (64 bits) and 5 (32 bits) hold them.
  template <typename Bits, typename Float>
  Proto& fixed(int field, int wire_type, Float v) {
    static_assert(sizeof(Bits) == sizeof(Float));
    key(field, wire_type);
    Bits bits = 0;
    std::memcpy(&bits, &v, sizeof(bits));
    for (size_t i = 0; i < sizeof(bits); ++i) out_ += static_cast<char>((bits >> (8 * i)) & 0xff);
    return *this;
  }
  void raw_varint(uint64_t v) {
    while (v >= 0x80) {
      out_ += static_cast<char>((v & 0x7f) | 0x80);
      v >>= 7;
    }
    out_ += static_cast<char>(v);
  }
  std::string out_;
};

// tensorflow.Event's fields.
constexpr int kEventWallTime = 1, kEventStep = 2, kEventFileVersion = 3, kEventSummary = 5,
              kEventSessionLog = 7;
// Summary.value; Summary.Value's tag, simple_value, tensor, metadata.
constexpr int kSummaryValue = 1, kValueTag = 1, kValueSimple = 2, kValueTensor = 8,
              kValueMetadata = 9;
// SummaryMetadata.plugin_data; PluginData's plugin_name and content.
constexpr int kMetadataPluginData = 1, kPluginName = 1, kPluginContent = 2;
// TensorProto's dtype (DT_STRING = 7), tensor_shape (empty: a scalar), string_val.
constexpr int kTensorDtype = 1, kTensorShape = 2, kTensorStringVal = 8, kDtString = 7;

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

Proto event_at(int64_t step, double wall_time) {
  Proto e;
  e.fixed64_double(kEventWallTime, wall_time < 0 ? now_seconds() : wall_time);
  e.varint(kEventStep, static_cast<uint64_t>(step));
  return e;
}

Proto plugin_metadata(const std::string& plugin, const std::string& content) {
  Proto data;
  data.bytes(kPluginName, plugin);
  if (!content.empty()) data.bytes(kPluginContent, content);
  Proto metadata;
  metadata.message(kMetadataPluginData, data);
  return metadata;
}

// google.protobuf.Value: number_value = 2, string_value = 3, bool_value = 4.
Proto protobuf_value(const HParamValue& v) {
  Proto p;
  switch (v.kind()) {
    case HParamValue::Kind::kNumber:
      p.fixed64_double(2, v.number());
      break;
    case HParamValue::Kind::kString:
      p.bytes(3, v.string());
      break;
    case HParamValue::Kind::kBool:
      p.varint(4, v.boolean() ? 1 : 0);
      break;
  }
  return p;
}

// An event holding one summary value of the hparams plugin, whose content is
// HParamsPluginData{version = 1: 0, <field>: `info`}.
std::string hparams_event(const char* tag, int field, const Proto& info, int64_t step) {
  Proto data;
  data.varint(1, 0).message(field, info);
  Proto v;
  v.bytes(kValueTag, tag).message(kValueMetadata, plugin_metadata("hparams", data.str()));
  Proto summary;
  summary.message(kSummaryValue, v);
  return event_at(step, -1).message(kEventSummary, summary).str();
}

std::string hostname() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof(buf) - 1) != 0) return "localhost";
  return buf;
}

std::string markdown_cell(const std::string& s) {
  std::string out;
  for (char c : s) out += c == '|' ? std::string("\\|") : std::string(1, c == '\n' ? ' ' : c);
  return out;
}

}  // namespace

uint32_t crc32c(const void* data, size_t size) {
  static const std::array<uint32_t, 256> table = crc32c_table();
  const auto* p = static_cast<const unsigned char*>(data);
  uint32_t c = 0xffffffffu;
  for (size_t i = 0; i < size; ++i) c = table[(c ^ p[i]) & 0xff] ^ (c >> 8);
  return c ^ 0xffffffffu;
}

// ---------------------------------------------------------------- HParamValue

std::string HParamValue::to_string() const {
  switch (kind_) {
    case Kind::kNumber:
      return fmt::format("{}", number_);  // the shortest text that reads back as the same double
    case Kind::kString:
      return string_;
    case Kind::kBool:
      return bool_ ? "true" : "false";
  }
  return "";
}

// ---------------------------------------------------------------- EventFileWriter

EventFileWriter::EventFileWriter(const std::string& log_dir) {
  TORCH_CHECK(!log_dir.empty(), "EventFileWriter: log_dir must not be empty");
  detail::make_directories(log_dir, "EventFileWriter");
  static std::atomic<int> counter{0};
  const auto secs = static_cast<int64_t>(now_seconds());
  path_ = detail::join_path(log_dir, c10::str("events.out.tfevents.", secs, ".", hostname(), ".",
                                              ::getpid(), ".", counter.fetch_add(1)));
  file_ = std::fopen(path_.c_str(), "wbx");
  if (file_ == nullptr) detail::fail_errno("EventFileWriter", "cannot create", path_, errno);
  Proto first = event_at(0, -1);
  first.bytes(kEventFileVersion, "brain.Event:2");
  write_event(first.str());
}

EventFileWriter::~EventFileWriter() {
  if (file_ != nullptr) std::fclose(file_);
}

void EventFileWriter::write_event(const std::string& event) {
  std::string record(8, '\0');
  uint64_t n = event.size();
  for (int i = 0; i < 8; ++i) record[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  auto put32 = [&](uint32_t v) {
    for (int i = 0; i < 4; ++i) record += static_cast<char>((v >> (8 * i)) & 0xff);
  };
  put32(masked_crc32c(record.data(), 8));
  record += event;
  put32(masked_crc32c(event.data(), event.size()));
  if (std::fwrite(record.data(), 1, record.size(), file_) != record.size() ||
      std::fflush(file_) != 0) {
    detail::fail_errno("EventFileWriter", "cannot write", path_, errno);
  }
}

void EventFileWriter::add_scalar(const std::string& tag, double value, int64_t step,
                                 double wall_time) {
  Proto v;
  v.bytes(kValueTag, tag).fixed32_float(kValueSimple, static_cast<float>(value));
  Proto summary;
  summary.message(kSummaryValue, v);
  write_event(event_at(step, wall_time).message(kEventSummary, summary).str());
}

void EventFileWriter::add_text(const std::string& tag, const std::string& markdown, int64_t step) {
  Proto tensor;
  tensor.varint(kTensorDtype, kDtString)
      .message(kTensorShape, Proto())
      .bytes(kTensorStringVal, markdown);
  Proto v;
  v.bytes(kValueTag, tag)
      .message(kValueMetadata, plugin_metadata("text", ""))
      .message(kValueTensor, tensor);
  Proto summary;
  summary.message(kSummaryValue, v);
  write_event(event_at(step, -1).message(kEventSummary, summary).str());
}

void EventFileWriter::add_hparams(const HParams& hparams, int64_t step) {
  // session_start_info = 3 {hparams = 1 (a map: entries of key = 1, value = 2),
  // start_time_secs = 5}.
  Proto start;
  for (const auto& [name, value] : hparams) {
    Proto entry;
    entry.bytes(1, name).message(2, protobuf_value(value));
    start.message(1, entry);
  }
  start.fixed64_double(5, now_seconds());
  write_event(hparams_event("_hparams_/session_start_info", 3, start, step));
}

void EventFileWriter::end_session(bool success, int64_t step) {
  // session_end_info = 4 {status = 1 (STATUS_SUCCESS = 1, STATUS_FAILURE = 2), end_time_secs = 2}.
  Proto end;
  end.varint(1, success ? 1 : 2).fixed64_double(2, now_seconds());
  write_event(hparams_event("_hparams_/session_end_info", 4, end, step));
}

void EventFileWriter::restart_at(int64_t step) {
  Proto log;
  log.varint(1, 1);  // SessionLog.status = START
  write_event(event_at(step, -1).message(kEventSessionLog, log).str());
}

// ---------------------------------------------------------------- TensorBoardLogger

TensorBoardLogger::TensorBoardLogger(TensorBoardLoggerOptions options)
    : options_(std::move(options)) {
  TORCH_CHECK(!options_.log_dir().empty(), "TensorBoardLogger: log_dir must not be empty");
}

TensorBoardLogger::~TensorBoardLogger() = default;

std::string TensorBoardLogger::path() const { return last_path_; }

void TensorBoardLogger::on_fit_start(Trainer& trainer) {
  writer_ = std::make_unique<EventFileWriter>(options_.log_dir());
  last_path_ = writer_->path();
  const int64_t step = trainer.state().step;
  if (step > 0) writer_->restart_at(step);

  HParams hparams;
  if (options_.trainer_options()) {
    const auto& o = trainer.options();
    hparams.emplace("max_epochs", o.max_epochs());
    hparams.emplace("max_steps", o.max_steps());
    hparams.emplace("grad_accum_steps", o.grad_accum_steps());
    hparams.emplace("precision", to_string(o.precision()));
    hparams.emplace("grad_clip_norm", o.grad_clip_norm());
    hparams.emplace("seed", static_cast<double>(o.seed()));
    hparams.emplace("deterministic", o.deterministic());
    if (o.device()) hparams.emplace("device", o.device()->str());
    hparams.emplace("world_size", o.process_group() ? o.process_group()->world_size() : 1);
  }
  for (const auto& [k, v] : options_.hparams()) hparams.insert_or_assign(k, v);
  if (hparams.empty()) return;
  writer_->add_hparams(hparams, step);
  std::string table = "| option | value |\n|---|---|\n";
  for (const auto& [k, v] : hparams)
    table += "| " + markdown_cell(k) + " | " + markdown_cell(v.to_string()) + " |\n";
  writer_->add_text("run/options", table, step);
}

void TensorBoardLogger::write(Trainer& trainer, const Metrics& metrics) {
  TORCH_CHECK(writer_,
              "TensorBoardLogger: metrics before on_fit_start (the Trainer opens the file)");
  const int64_t step = trainer.state().step;
  const double now = now_seconds();
  for (const auto& [name, value] : metrics) {
    // The Trainer's logs repeat step and epoch, which every event has already.
    if (name == "step" || name == "epoch") continue;
    writer_->add_scalar(name, value, step, now);
  }
}

void TensorBoardLogger::on_log(Trainer& trainer, const Metrics& logs) { write(trainer, logs); }

void TensorBoardLogger::on_validation_end(Trainer& trainer, const Metrics& metrics) {
  write(trainer, metrics);
}

void TensorBoardLogger::on_fit_end(Trainer& trainer) {
  if (!writer_) return;
  writer_->end_session(/*success=*/true, trainer.state().step);
  writer_.reset();
}

}  // namespace wick
