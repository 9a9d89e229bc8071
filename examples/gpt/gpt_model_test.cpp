// wick-gpt's model and corpus: causality, the KV cache against the full
// forward, the MoE layer against a token-by-token reference, sampling, and
// the corpus split.
#include "config.h"
#include "corpus.h"
#include "model.h"
#include "serve.h"

#include <fstream>
#include <set>
#include <thread>

#include <gtest/gtest.h>

#include "support.h"

namespace {

class GptModelTest : public wick::testing::SeededTest {};

gpt::GPTConfig small(bool moe = false) {
  gpt::GPTConfig c;
  c.context = 32;
  c.layers = 2;
  c.width = 32;
  c.heads = 4;
  c.ffn_hidden = 48;
  c.moe = moe;
  c.experts = 4;
  c.shared_experts = 1;
  c.top_k = 2;
  c.expert_hidden = 16;
  return c;
}

TEST_F(GptModelTest, LaterTokensDoNotChangeEarlierLogits) {
  for (bool moe : {false, true}) {
    gpt::GPT model(small(moe));
    model->eval();
    auto a = torch::randint(0, 256, {2, 20});
    auto b = a.clone();
    b.narrow(1, 12, 8).random_(0, 256);
    torch::NoGradGuard g;
    auto la = model(a), lb = model(b);
    EXPECT_TRUE(torch::allclose(la.narrow(1, 0, 12), lb.narrow(1, 0, 12), 1e-5, 1e-5))
        << "moe " << moe;
    EXPECT_FALSE(torch::allclose(la.narrow(1, 12, 8), lb.narrow(1, 12, 8), 1e-5, 1e-5));
  }
}

TEST_F(GptModelTest, KvCacheGivesTheFullForwardsLogits) {
  gpt::GPT model(small());
  model->eval();
  auto tokens = torch::randint(0, 256, {1, 24});
  torch::NoGradGuard g;
  auto full = model(tokens);
  gpt::KVCache cache;
  std::vector<torch::Tensor> parts{model->forward(tokens.narrow(1, 0, 10), &cache)};  // prefill
  parts.push_back(model->forward(tokens.narrow(1, 10, 5), &cache));  // a chunk with a past
  for (int64_t t = 15; t < 24; ++t) parts.push_back(model->forward(tokens.narrow(1, t, 1), &cache));
  EXPECT_EQ(cache.length(), 24);
  WICK_EXPECT_CLOSE(torch::cat(parts, 1), full, 1e-4, 1e-5);
  EXPECT_THROWS_WITH(model->forward(torch::randint(0, 256, {1, 9}), &cache),
                     "33 positions exceed the context of 32");
}

TEST_F(GptModelTest, MoEMatchesATokenByTokenReference) {
  auto c = small(true);
  gpt::MoE moe(c);
  auto x = torch::randn({3, 5, c.width});
  torch::NoGradGuard g;
  auto y = moe(x);
  auto flat = x.reshape({-1, c.width});
  auto probs = torch::softmax(moe->router(flat), -1);
  std::vector<double> share(c.experts, 0.0);
  for (int64_t n = 0; n < flat.size(0); ++n) {
    auto token = flat[n].unsqueeze(0);
    auto expected = moe->shared[0]->as<gpt::SwiGLUImpl>()->forward(token);
    auto [p, idx] = probs[n].topk(c.top_k);
    auto w = p / p.sum();
    for (int64_t k = 0; k < c.top_k; ++k) {
      const int64_t e = idx[k].item<int64_t>();
      expected = expected + w[k] * moe->routed[e]->as<gpt::SwiGLUImpl>()->forward(token);
      share[e] += 1.0 / static_cast<double>(flat.size(0) * c.top_k);
    }
    WICK_EXPECT_CLOSE(y.reshape({-1, c.width})[n], expected.squeeze(0), 1e-4, 1e-5);
  }
  double aux = 0;
  auto mean_p = probs.mean(0);
  for (int64_t e = 0; e < c.experts; ++e) aux += share[e] * mean_p[e].item<double>();
  EXPECT_NEAR(moe->aux_loss().item<double>(), c.experts * aux, 1e-5);
}

TEST_F(GptModelTest, SamplingRules) {
  auto logits = torch::tensor({0.1f, 2.0f, 1.9f, -1.0f});
  auto gen = at::make_generator<at::CPUGeneratorImpl>(0);
  gpt::SampleOptions greedy;
  greedy.temperature = 0;
  EXPECT_EQ(gpt::sample_token(logits, greedy, gen), 1);
  gpt::SampleOptions top1;
  top1.top_k = 1;
  gpt::SampleOptions nucleus;
  nucleus.top_p = 0.3;  // the top token alone has more than 0.3 of the mass
  std::set<int64_t> seen_top2;
  gpt::SampleOptions top2;
  top2.top_k = 2;
  top2.temperature = 1.0;
  for (int i = 0; i < 200; ++i) {
    EXPECT_EQ(gpt::sample_token(logits, top1, gen), 1);
    EXPECT_EQ(gpt::sample_token(logits, nucleus, gen), 1);
    seen_top2.insert(gpt::sample_token(logits, top2, gen));
  }
  EXPECT_EQ(seen_top2, (std::set<int64_t>{1, 2}));
}

TEST_F(GptModelTest, CorpusSplitIsDeterministicAndDisjoint) {
  wick::testing::TempDir dir;
  const auto root = dir.path().string();
  {
    std::ofstream a(root + "/b-file");
    for (int i = 0; i < 30; ++i) a << "fortune b" << i << "\n%\n";
    std::ofstream b(root + "/a-file");
    b << "first a\nsecond line\n%\nsecond a\n";
    std::ofstream idx(root + "/a-file.dat");
    idx << "binary index, skipped";
  }
  auto c = gpt::load_fortunes(root, 10);
  EXPECT_EQ(c.files, 2);
  EXPECT_EQ(c.train_fortunes + c.val_fortunes, 32);
  EXPECT_EQ(c.val_fortunes, 4);  // fortunes 0, 10, 20, 30 in name order
  auto text = [](const torch::Tensor& t) {
    std::string s;
    for (int64_t i = 0; i < t.numel(); ++i) s.push_back(static_cast<char>(t[i].item<int64_t>()));
    return s;
  };
  const std::string val = text(c.val), train = text(c.train);
  EXPECT_EQ(val.rfind("first a\nsecond line\n\n", 0), 0u) << val;  // fortune 0 is a-file's first
  EXPECT_NE(val.find("fortune b8\n"), std::string::npos);          // fortune 10
  EXPECT_EQ(train.find("fortune b8\n"), std::string::npos);
  EXPECT_EQ(train.find("binary index"), std::string::npos);
  auto w = gpt::make_windows(c.train, 9, 4);
  EXPECT_EQ(w.size(1), 9);
  EXPECT_TRUE(torch::equal(w[1].narrow(0, 0, 5), w[0].narrow(0, 4, 5)));
  EXPECT_THROWS_WITH(gpt::load_fortunes(root + "/missing"), "cannot open");
}

// Regression (fuzz/corpus_fuzz.cpp, UBSan): a corpus whose only fortune goes
// to validation left train empty, and its tensor was filled by memcpy from a
// null data_ptr(). Files of blank fortunes, "%" lines only, and no newline at
// the end.
TEST_F(GptModelTest, CorpusWithAnEmptySplitOrBlankFiles) {
  wick::testing::TempDir dir;
  const auto root = dir.path().string();
  {
    std::ofstream a(root + "/a");
    a << "only one";  // no final newline
    std::ofstream b(root + "/b");
    b << "%\n%\n \n\t\n%";
    std::ofstream c(root + "/c");  // empty
  }
  auto c = gpt::load_fortunes(root, 2);
  EXPECT_EQ(c.files, 3);
  EXPECT_EQ(c.val_fortunes, 1);
  EXPECT_EQ(c.train_fortunes, 0);
  EXPECT_EQ(c.train.numel(), 0);
  EXPECT_EQ(c.train.scalar_type(), torch::kLong);
  ASSERT_EQ(c.val.numel(), 10);  // "only one\n\n": the line's newline and the fortune's
  EXPECT_EQ(c.val[0].item<int64_t>(), 'o');
  EXPECT_EQ(c.val[9].item<int64_t>(), '\n');
}

// gpt_config.json: what wick-gpt train writes reads back; anything else is a
// c10::Error naming the file and the key (it leaked nlohmann's exceptions and
// took negative or 2^40 sizes before; fuzz/gpt_config_fuzz.cpp).
TEST_F(GptModelTest, ConfigFileRoundTripsAndRejectsBadValues) {
  gpt::GPTConfig c = small(/*moe=*/true);
  c.rope_base = 500.25;
  c.aux_loss_weight = 0.125;
  const gpt::GPTConfig back = gpt::parse_config(gpt::config_to_json(c), "x");
  EXPECT_EQ(back.width, 32);
  EXPECT_EQ(back.heads, 4);
  EXPECT_EQ(back.top_k, 2);
  EXPECT_TRUE(back.moe);
  EXPECT_EQ(back.rope_base, 500.25);
  EXPECT_EQ(back.aux_loss_weight, 0.125);

  const std::string good = gpt::config_to_json(small());
  auto with = [&](const std::string& key, const std::string& value) {
    const auto at = good.find("\"" + key + "\"");
    const auto colon = good.find(':', at), end = good.find_first_of(",\n}", colon + 2);
    return good.substr(0, colon + 2) + value + good.substr(end);
  };
  EXPECT_THROWS_WITH(gpt::parse_config("{\"vocab\": 256,", "run/gpt_config.json"),
                     "gpt config: 'run/gpt_config.json' is not valid JSON");
  EXPECT_THROWS_WITH(gpt::parse_config("[1]", "f"), "must hold a JSON object, got array");
  EXPECT_THROWS_WITH(gpt::parse_config("{}", "f"), "'f' has no \"vocab\"");
  EXPECT_THROWS_WITH(gpt::parse_config(with("width", "\"32\""), "f"),
                     "\"width\" must be an integer, got \"32\"");
  EXPECT_THROWS_WITH(gpt::parse_config(with("layers", "-1"), "f"),
                     "\"layers\" must be in [1, 2147483647], got -1");
  EXPECT_THROWS_WITH(gpt::parse_config(with("width", "1099511627776"), "f"), "got 1099511627776");
  EXPECT_THROWS_WITH(gpt::parse_config(with("heads", "18446744073709551615"), "f"),
                     "\"heads\" must be in");
  EXPECT_THROWS_WITH(gpt::parse_config(with("moe", "1"), "f"), "\"moe\" must be true or false");
  EXPECT_THROWS_WITH(gpt::parse_config(with("rope_base", "0"), "f"), "\"rope_base\" must be > 0");
  EXPECT_THROWS_WITH(gpt::parse_config(with("aux_loss_weight", "-0.5"), "f"),
                     "\"aux_loss_weight\" must be >= 0");
  EXPECT_THROWS_WITH(gpt::parse_config(with("heads", "3"), "f"),
                     "gpt config: 'f': GPTConfig: width 32 must be divisible by heads 3");
  EXPECT_THROWS_WITH(gpt::read_config("/nonexistent/gpt_config.json"),
                     "cannot read '/nonexistent/gpt_config.json'");
}

// Every answer of the continuous batcher equals generate() for that request
// alone: greedy and seeded sampling, prompts longer than the context, answers
// cut by max_new_tokens or by the context; in float64, so that batched and
// single matrix products cannot round a near-tie apart.
TEST_F(GptModelTest, ContinuousBatchingAnswersAsGeneratingAlone) {
  gpt::GPT model(small());
  model->to(torch::kDouble);
  std::vector<std::pair<std::string, gpt::SampleOptions>> requests;
  for (int i = 0; i < 24; ++i) {
    gpt::SampleOptions o;
    o.max_new_tokens = std::vector<int64_t>{1, 5, 12, 40}[i % 4];
    o.temperature = i % 3 == 0 ? 0.0 : 1.0;
    o.top_k = i % 2 ? 20 : 0;
    o.seed = static_cast<uint64_t>(i);
    requests.emplace_back(
        std::string(static_cast<size_t>(1 + (i * 7) % 45), static_cast<char>('a' + i)), o);
  }
  std::vector<std::string> alone;
  for (const auto& [prompt, o] : requests) alone.push_back(gpt::generate(model, prompt, o));

  for (auto mode : {gpt::BatchingMode::kContinuous, gpt::BatchingMode::kStatic}) {
    SCOPED_TRACE(mode == gpt::BatchingMode::kContinuous ? "continuous" : "static");
    gpt::ContinuousBatcher server(model, gpt::ServeOptions{5, mode});
    std::vector<std::future<std::string>> answers(requests.size());
    std::vector<std::thread> clients;
    for (int c = 0; c < 4; ++c) {
      clients.emplace_back([&, c] {
        for (size_t i = static_cast<size_t>(c); i < requests.size(); i += 4) {
          answers[i] = server.submit(requests[i].first, requests[i].second);
        }
      });
    }
    for (auto& t : clients) t.join();
    for (size_t i = 0; i < requests.size(); ++i)
      EXPECT_EQ(answers[i].get(), alone[i]) << "request " << i;
    auto stats = server.stats();
    EXPECT_EQ(stats.requests, 24);
    EXPECT_GT(stats.max_batch_seen, 1);
    EXPECT_LE(stats.max_batch_seen, 5);
  }
  gpt::ContinuousBatcher server(model, gpt::ServeOptions{2, gpt::BatchingMode::kContinuous});
  EXPECT_THROWS_WITH(server.submit("", gpt::SampleOptions{}).get(), "the prompt is empty");
}

}  // namespace
