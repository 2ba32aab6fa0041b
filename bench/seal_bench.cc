// Seal and unseal through custody against the raw token operation they wrap.
//
// Baselines, on the same SoftHSM2 token, the same AES-256 key attributes, a
// 64-byte value and an AAD of the same length as ours:
//   raw_encrypt  C_EncryptInit + C_Encrypt (AES-GCM, counter IV: no RNG call)
//   raw_decrypt  C_DecryptInit + C_Decrypt of a valid ciphertext
// Ours:
//   seal         Sealer::Seal   (nonce from the token RNG, usage ledger in SQLite)
//   unseal       Sealer::Unseal (blob parse, KEK check, decrypt into a locked buffer)
// At the end the ratios ours/raw are printed; the target is >= 0.80.
#include <benchmark/benchmark.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>

#include "custody/hsm/objects.h"
#include "custody/hsm/pkcs11_sealer.h"
#include "custody/hsm/uri.h"
#include "custody/seal/sealer.h"
#include "custody/store/sqlite_store.h"
#include "custody/store/store.h"
#include "ratio_reporter.h"

namespace {

using namespace custody;

constexpr size_t kValueSize = 64;

struct Fixture {
  std::string dir;
  std::shared_ptr<hsm::Module> module;
  std::unique_ptr<hsm::SessionPool> pool;
  std::unique_ptr<core::Store> store;
  std::unique_ptr<core::Sealer> sealer;
  core::KekRef kek;
  SecretBuffer value = SecretBuffer(kValueSize);
  std::vector<uint8_t> blob;
  core::SealContext ctx{"payments", "prod", "stripe-api-key", 1};

  ~Fixture() {
    sealer.reset();
    pool.reset();
    module.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
};

Fixture* g_fx = nullptr;

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "seal_bench: %s\n", what.c_str());
  std::exit(1);
}

void Setup() {
  auto* fx = new Fixture();
  char tmpl[] = "/tmp/custody-bench-XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) Die("mkdtemp failed");
  fx->dir = tmpl;
  std::filesystem::create_directories(fx->dir + "/tokens");
  std::string conf = fx->dir + "/softhsm2.conf";
  std::ofstream(conf) << "directories.tokendir = " << fx->dir << "/tokens\nobjectstore.backend = file\nlog.level = ERROR\n";
  ::setenv("SOFTHSM2_CONF", conf.c_str(), 1);
  std::string cmd = "softhsm2-util --init-token --free --label bench --so-pin 87654321 --pin 12345678 >/dev/null";
  if (std::system(cmd.c_str()) != 0) Die("softhsm2-util --init-token failed");

  auto m = hsm::Module::Load("/usr/lib/softhsm/libsofthsm2.so");
  if (!m) Die(m.error().message());
  fx->module = *m;
  auto slot = hsm::FindSlot(*fx->module, *hsm::TokenUri::Parse("pkcs11:token=bench"));
  if (!slot) Die(slot.error().message());
  auto pool = hsm::SessionPool::Open(fx->module, *slot, SecretBuffer::Copy(std::string_view("12345678")));
  if (!pool) Die(pool.error().message());
  fx->pool = std::move(*pool);
  auto store = core::OpenSqliteStore(fx->dir + "/custody.db", true);
  if (!store) Die(store.error().message());
  fx->store = std::move(*store);
  fx->sealer = std::make_unique<core::Pkcs11Sealer>(*fx->pool, *fx->store);
  auto kek = fx->sealer->CreateKek("payments", 1);
  if (!kek) Die(kek.error().message());
  fx->kek = *kek;
  if (!fx->store->CreateProject("payments", {"prod"}, fx->kek, "bench").ok()) Die("store");
  auto v = fx->value.RevealMutable(SecretAccess{});
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<uint8_t>('a' + i % 26);
  auto blob = fx->sealer->Seal(fx->kek, fx->ctx, fx->value);
  if (!blob) Die(blob.error().message());
  fx->blob = *blob;
  g_fx = fx;
}

CK_OBJECT_HANDLE FindKek(hsm::Session& s) {
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof cls},
                      {CKA_ID, g_fx->kek.id.data(), static_cast<CK_ULONG>(g_fx->kek.id.size())}};
  auto found = hsm::FindObjects(s, t, 1);
  if (!found || found->empty()) Die("KEK not found");
  return (*found)[0];
}

// The AAD custody uses is header + context; the baselines use one of the same length.
std::vector<uint8_t> SameLengthAad() {
  auto view = core::ParseBlob(g_fx->blob);
  return core::ContextAad(view->header_bytes, g_fx->ctx);
}

void BM_RawEncrypt(benchmark::State& state) {
  auto lease = g_fx->pool->Acquire();
  CK_OBJECT_HANDLE key = FindKek(**lease);
  std::vector<uint8_t> aad = SameLengthAad();
  uint8_t iv[12] = {};
  std::vector<uint8_t> in(kValueSize, 'x'), out(kValueSize + 16);
  uint64_t counter = 0;
  for (auto _ : state) {
    ++counter;
    std::memcpy(iv, &counter, sizeof counter);
    CK_GCM_PARAMS gcm{iv, 12, 96, aad.data(), static_cast<CK_ULONG>(aad.size()), 128};
    CK_MECHANISM mech{CKM_AES_GCM, &gcm, sizeof gcm};
    CK_ULONG n = static_cast<CK_ULONG>(out.size());
    if ((*lease)->fn()->C_EncryptInit((*lease)->handle(), &mech, key) != CKR_OK ||
        (*lease)->fn()->C_Encrypt((*lease)->handle(), in.data(), kValueSize, out.data(), &n) != CKR_OK) {
      state.SkipWithError("raw encrypt failed");
      break;
    }
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(state.iterations());
}

void BM_RawDecrypt(benchmark::State& state) {
  auto lease = g_fx->pool->Acquire();
  CK_OBJECT_HANDLE key = FindKek(**lease);
  auto view = core::ParseBlob(g_fx->blob);
  std::vector<uint8_t> aad = SameLengthAad();
  std::vector<uint8_t> ct(view->ciphertext_and_tag.begin(), view->ciphertext_and_tag.end());
  std::array<uint8_t, 12> iv = view->header.nonce;
  std::vector<uint8_t> out(ct.size());
  for (auto _ : state) {
    CK_GCM_PARAMS gcm{iv.data(), 12, 96, aad.data(), static_cast<CK_ULONG>(aad.size()), 128};
    CK_MECHANISM mech{CKM_AES_GCM, &gcm, sizeof gcm};
    CK_ULONG n = static_cast<CK_ULONG>(out.size());
    if ((*lease)->fn()->C_DecryptInit((*lease)->handle(), &mech, key) != CKR_OK ||
        (*lease)->fn()->C_Decrypt((*lease)->handle(), ct.data(), static_cast<CK_ULONG>(ct.size()), out.data(), &n) !=
            CKR_OK) {
      state.SkipWithError("raw decrypt failed");
      break;
    }
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(state.iterations());
}

void BM_Seal(benchmark::State& state) {
  for (auto _ : state) {
    auto blob = g_fx->sealer->Seal(g_fx->kek, g_fx->ctx, g_fx->value);
    if (!blob) {
      state.SkipWithError(blob.error().message().c_str());
      break;
    }
    benchmark::DoNotOptimize(blob->data());
  }
  state.SetItemsProcessed(state.iterations());
}

void BM_Unseal(benchmark::State& state) {
  for (auto _ : state) {
    auto v = g_fx->sealer->Unseal(g_fx->kek, g_fx->ctx, g_fx->blob);
    if (!v) {
      state.SkipWithError(v.error().message().c_str());
      break;
    }
    benchmark::DoNotOptimize(v->Reveal(SecretAccess{}).data());
  }
  state.SetItemsProcessed(state.iterations());
}

}  // namespace

BENCHMARK(BM_RawEncrypt)->MinTime(1.0);
BENCHMARK(BM_Seal)->MinTime(1.0);
BENCHMARK(BM_RawDecrypt)->MinTime(1.0);
BENCHMARK(BM_Unseal)->MinTime(1.0);
BENCHMARK(BM_RawDecrypt)->Threads(2)->MinTime(1.0)->UseRealTime();
BENCHMARK(BM_Unseal)->Threads(2)->MinTime(1.0)->UseRealTime();

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  Setup();
  custody::bench::RatioReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  auto ratio = [&](const std::string& ours, const std::string& raw) {
    auto a = reporter.rates.find(ours), b = reporter.rates.find(raw);
    if (a == reporter.rates.end() || b == reporter.rates.end() || b->second <= 0) return;
    double r = a->second / b->second;
    std::printf("ratio %-34s / %-38s = %.2f  (%.0f/s vs %.0f/s, target >= 0.80: %s)\n", ours.c_str(), raw.c_str(), r,
                a->second, b->second, r >= 0.8 ? "met" : "NOT met");
  };
  std::printf("\n");
  ratio("BM_Seal/min_time:1.000", "BM_RawEncrypt/min_time:1.000");
  ratio("BM_Unseal/min_time:1.000", "BM_RawDecrypt/min_time:1.000");
  ratio("BM_Unseal/min_time:1.000/real_time/threads:2", "BM_RawDecrypt/min_time:1.000/real_time/threads:2");
  delete g_fx;
  benchmark::Shutdown();
  return 0;
}
