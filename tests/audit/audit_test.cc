// The audit log with a real token for checkpoint signatures, real files and
// real processes: tampering of every kind is found at the right record,
// concurrent writers keep one valid chain, and a crash mid-write is survived.
#include <gtest/gtest.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <signal.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <future>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "../../audit/src/audit_impl.h"  // ReadAuditFiles, for the reader racing a prune
#include "../support/sealer_fixture.h"
#include "custody/audit/audit.h"
#include "custody/common/hex.h"
#include "custody/hsm/objects.h"
#include "custody/hsm/token_signer.h"
#include "custody/tpm/tpm_signer.h"

namespace custody::core {
namespace {

using test::SoftHsmToken;

AuditEvent Event(int i) {
  AuditEvent e;
  e.action = "secret.get";
  e.principal = "user:alice";
  e.identified_by = "uid 1000 (alice)";
  e.project = "payments";
  e.environment = "prod";
  e.name = "stripe-key";
  e.version = static_cast<uint32_t>(i);
  e.decision = core::AuditDecision::kAllow;
  e.rule = "grant #1";
  e.result = core::AuditResult::kOk;
  e.request_id = "req-" + std::to_string(i);
  return e;
}

std::vector<std::string> Lines(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> out;
  for (std::string l; std::getline(in, l);) out.push_back(l);
  return out;
}

void WriteLines(const std::string& path, const std::vector<std::string>& lines) {
  std::ofstream out(path, std::ios::trunc);
  for (const auto& l : lines) out << l << "\n";
}

std::string Sha256Hex(const std::string& s) {
  unsigned char md[32];
  unsigned int n = 0;
  EVP_Digest(s.data(), s.size(), md, &n, EVP_sha256(), nullptr);
  return ToHex(std::span<const uint8_t>(md, 32));
}

// Rewrites a record's body and re-hashes it, as an attacker who knows the
// format would; returns the new hash.
std::string Reseal(std::string& line, const std::string& from, const std::string& to, const std::string& new_prev = "") {
  std::string body = line.substr(0, line.size() - 75) + "}";
  if (!from.empty()) body.replace(body.find(from), from.size(), to);
  if (!new_prev.empty()) {
    size_t at = body.find("\"prev\":\"") + 8;
    body.replace(at, 64, new_prev);
  }
  std::string h = Sha256Hex(body);
  line = body.substr(0, body.size() - 1) + ",\"hash\":\"" + h + "\"}";
  return h;
}

class AuditTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_NO_FATAL_FAILURE(test::OpenSessionPool(token_, module_, pool_));
    auto signer = TokenAuditSigner::Open(*pool_, true);
    ASSERT_TRUE(signer.ok()) << signer.error().message();
    signer_ = std::move(*signer);
    pem_ = *signer_->PublicKeyPem();
    opts_.dir = dir_ / "audit";
    opts_.checkpoint_every = 4;
    auto log = AuditLog::Open(opts_);
    ASSERT_TRUE(log.ok()) << log.error().message();
    log_ = std::move(*log);
  }
  void TearDown() override {
    log_.reset();
    signer_.reset();
    pool_.reset();
  }
  // Closes the log and opens it again over `storage` (a test's wrapper of
  // the file storage); the caller keeps the returned pointer to drive it.
  template <typename S>
  void ReopenWith(std::unique_ptr<S> storage, S** kept) {
    log_.reset();
    *kept = storage.get();
    auto opened = AuditLog::Open(opts_, std::move(storage));
    ASSERT_TRUE(opened.ok()) << opened.error().message();
    log_ = std::move(*opened);
  }

  // seq 1..4 events, 5 checkpoint, 6..9 events, 10 checkpoint, 11..12 events.
  void WriteStandard() {
    for (int i = 1; i <= 12; ++i) {
      if (i == 5 || i == 10) {
        ASSERT_TRUE(log_->CheckpointDue());
        auto c = log_->Checkpoint(*signer_);
        ASSERT_TRUE(c.ok()) << c.error().message();
        EXPECT_EQ(*c, static_cast<uint64_t>(i));
      } else {
        auto s = log_->Append(Event(i));
        ASSERT_TRUE(s.ok()) << s.error().message();
        EXPECT_EQ(*s, static_cast<uint64_t>(i));
      }
    }
  }
  AuditVerifyReport Verify() {
    AuditVerifyOptions o;
    o.dir = opts_.dir;
    o.public_key_pem = pem_;
    auto r = VerifyAuditLog(o);
    EXPECT_TRUE(r.ok()) << r.error().message();
    return *r;
  }
  std::string Segment() const { return opts_.dir + "/audit-000001.jsonl"; }
  void ExpectProblem(const std::string& starts, const std::string& contains) {
    auto r = Verify();
    EXPECT_FALSE(r.intact);
    EXPECT_EQ(r.problem.rfind(starts, 0), 0u) << r.problem;
    EXPECT_NE(r.problem.find(contains), std::string::npos) << r.problem;
  }

  SoftHsmToken token_;
  test::TempDir dir_;
  std::shared_ptr<hsm::Module> module_;
  std::unique_ptr<hsm::SessionPool> pool_;
  std::unique_ptr<TokenAuditSigner> signer_;
  std::string pem_;
  AuditOptions opts_;
  std::unique_ptr<AuditLog> log_;
};

// Checkpoints are due every checkpoint_every records, and not before: with
// the time rule out of the way (an hour), the record count alone decides.
TEST_F(AuditTest, ACheckpointIsDueAtNRecordsAndNotBefore) {
  log_.reset();
  opts_.checkpoint_every = 5;
  opts_.checkpoint_seconds = 3600;
  auto log = AuditLog::Open(opts_);
  ASSERT_TRUE(log.ok()) << log.error().message();
  log_ = std::move(*log);
  EXPECT_FALSE(log_->CheckpointDue()) << "an empty log has nothing to sign";
  ASSERT_TRUE(log_->Append(Event(1)).ok());
  // Never signed yet: the time rule makes the first record due at once.
  EXPECT_TRUE(log_->CheckpointDue());
  ASSERT_TRUE(log_->Checkpoint(*signer_).ok());
  EXPECT_FALSE(log_->CheckpointDue()) << "nothing since the checkpoint";
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(log_->Append(Event(10 + i)).ok());
    EXPECT_FALSE(log_->CheckpointDue()) << (i + 1) << " records after the checkpoint, fewer than 5";
  }
  ASSERT_TRUE(log_->Append(Event(20)).ok());
  EXPECT_TRUE(log_->CheckpointDue()) << "5 records after the checkpoint";
}

// And every checkpoint_seconds, however few records came.
TEST_F(AuditTest, ACheckpointIsDueAfterTSecondsWithFewRecords) {
  log_.reset();
  opts_.checkpoint_every = 1000;
  opts_.checkpoint_seconds = 1;
  auto log = AuditLog::Open(opts_);
  ASSERT_TRUE(log.ok()) << log.error().message();
  log_ = std::move(*log);
  ASSERT_TRUE(log_->Append(Event(1)).ok());
  ASSERT_TRUE(log_->Checkpoint(*signer_).ok());
  ASSERT_TRUE(log_->Append(Event(2)).ok());
  // Whole seconds: two clock ticks are sure to pass T = 1 s.
  std::this_thread::sleep_for(std::chrono::milliseconds(2100));
  EXPECT_TRUE(log_->CheckpointDue()) << "one record, past checkpoint_seconds";
}

TEST_F(AuditTest, AnIntactLogVerifiesWithItsCheckpoints) {
  WriteStandard();
  auto r = Verify();
  EXPECT_TRUE(r.intact) << r.problem;
  EXPECT_EQ(r.records, 12u);
  EXPECT_EQ(r.checkpoints, 2u);
  EXPECT_EQ(r.last_checkpoint_seq, 10u);
  EXPECT_EQ(r.unsigned_tail, 2u);
  auto lines = Lines(Segment());
  ASSERT_EQ(lines.size(), 12u);
  auto first = ParseAuditRecord(lines[0]);
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(first->prev, std::string(64, '0'));
  EXPECT_EQ(first->event.action, "secret.get");
  EXPECT_EQ(*first->event.version, 1u);
  EXPECT_EQ(ParseAuditRecord(lines[1])->prev, first->hash);
}

TEST_F(AuditTest, TheStockOpensslCommandVerifiesACheckpoint) {
  WriteStandard();
  std::string pem_file = dir_ / "audit.pem";
  test::WriteFile(pem_file, pem_);
  std::string base = opts_.dir + "/checkpoints/000000000010";
  auto r = test::RunProgram("/usr/bin/openssl", {"dgst", "-sha256", "-verify", pem_file, "-signature", base + ".sig",
                                                 base + ".msg"},
                            {});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("Verified OK"), std::string::npos) << r.out;
  // And a changed message does not verify.
  test::WriteFile(base + ".msg", test::ReadFile(base + ".msg") + "x");
  auto bad = test::RunProgram("/usr/bin/openssl", {"dgst", "-sha256", "-verify", pem_file, "-signature", base + ".sig",
                                                   base + ".msg"},
                              {});
  EXPECT_NE(bad.exit_code, 0);
}

TEST_F(AuditTest, ModifiedRecordIsFoundAtThatRecord) {
  WriteStandard();
  auto lines = Lines(Segment());
  lines[6].replace(lines[6].find("user:alice"), 10, "user:mallo");
  WriteLines(Segment(), lines);
  ExpectProblem("record at audit-000001.jsonl:7", "modified: its content does not match its hash");
}

TEST_F(AuditTest, DeletedRecordIsFoundWhereItWasMissing) {
  WriteStandard();
  auto lines = Lines(Segment());
  lines.erase(lines.begin() + 6);  // seq 7
  WriteLines(Segment(), lines);
  ExpectProblem("record seq 8 (audit-000001.jsonl:7)", "deleted: seq 7 missing before it");
}

TEST_F(AuditTest, InsertedRecordIsFound) {
  WriteStandard();
  auto lines = Lines(Segment());
  lines.insert(lines.begin() + 7, lines[6]);  // a second copy of seq 7 after it
  WriteLines(Segment(), lines);
  ExpectProblem("record seq 7 (audit-000001.jsonl:8)", "inserted: a second copy of seq 7");
}

TEST_F(AuditTest, ReorderedRecordsAreFound) {
  WriteStandard();
  auto lines = Lines(Segment());
  std::swap(lines[6], lines[7]);  // seq 8 before seq 7
  WriteLines(Segment(), lines);
  ExpectProblem("record seq 8 (audit-000001.jsonl:7)", "reordered: seq 8 comes before seq 7");
}

TEST_F(AuditTest, TruncationBackPastACheckpointIsFound) {
  WriteStandard();
  auto lines = Lines(Segment());
  lines.resize(8);  // cut seq 9..12: the checkpoint at seq 10 is gone
  WriteLines(Segment(), lines);
  ExpectProblem("truncated: the log ends at seq 8", "checkpoint at seq 10");
  // With the store as witness instead of the checkpoints folder.
  std::filesystem::remove_all(opts_.dir + "/checkpoints");
  AuditVerifyOptions o;
  o.dir = opts_.dir;
  o.public_key_pem = pem_;
  o.witness = std::make_pair(uint64_t{10}, std::string(64, 'a'));
  auto r = VerifyAuditLog(o);
  EXPECT_NE(r->problem.find("the store records a checkpoint at seq 10"), std::string::npos) << r->problem;
}

TEST_F(AuditTest, TheStoreWitnessMustMatchTheCheckpointItRecorded) {
  std::pair<uint64_t, std::string> covers;
  for (int i = 1; i <= 4; ++i) ASSERT_TRUE(log_->Append(Event(i)).ok());
  auto c = log_->Checkpoint(*signer_, &covers);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(covers.first, 4u);
  AuditVerifyOptions o;
  o.dir = opts_.dir;
  o.public_key_pem = pem_;
  o.witness = std::make_pair(*c, covers.second);
  EXPECT_TRUE(VerifyAuditLog(o)->intact);
  o.witness = std::make_pair(*c, std::string(64, 'b'));
  auto r = VerifyAuditLog(o);
  EXPECT_FALSE(r->intact);
  EXPECT_NE(r->problem.find("the store recorded a checkpoint here that the log does not have"), std::string::npos);
}

// Retention: a log with one record per segment (seq 1..12, checkpoints at
// 5 and 10), for pruning whole segments.
class AuditPruneTest : public AuditTest {
 protected:
  void SetUp() override {
    ASSERT_NO_FATAL_FAILURE(AuditTest::SetUp());
    log_.reset();
    opts_.segment_bytes = 1;  // every batch starts a segment
    auto log = AuditLog::Open(opts_);
    ASSERT_TRUE(log.ok()) << log.error().message();
    log_ = std::move(*log);
    ASSERT_NO_FATAL_FAILURE(WriteStandard());
    Status scanned = log_->storage().ScanPruneUnits("", [&](const AuditPruneUnit& u) {
      units_.push_back(u);
      return true;
    });
    ASSERT_TRUE(scanned.ok()) << scanned.error().message();
  }
  // The statement `custody audit prune` writes, signed by the audit key,
  // or (`forged`) by a key of the forger's own.
  std::string Statement(uint64_t starts_at, const std::string& prev, bool forged = false) {
    const std::string message = AuditPruneMessage(starts_at, prev);
    std::vector<uint8_t> sig;
    if (forged) {
      EVP_PKEY* key = EVP_EC_gen("P-256");
      EVP_MD_CTX* ctx = EVP_MD_CTX_new();
      size_t n = 0;
      EXPECT_EQ(EVP_DigestSignInit(ctx, nullptr, EVP_sha256(), nullptr, key), 1);
      EXPECT_EQ(EVP_DigestSign(ctx, nullptr, &n, reinterpret_cast<const unsigned char*>(message.data()), message.size()), 1);
      sig.resize(n);
      EXPECT_EQ(EVP_DigestSign(ctx, sig.data(), &n, reinterpret_cast<const unsigned char*>(message.data()), message.size()), 1);
      sig.resize(n);
      EVP_MD_CTX_free(ctx);
      EVP_PKEY_free(key);
    } else {
      auto signed_by_token = signer_->Sign(message);
      EXPECT_TRUE(signed_by_token.ok());
      if (signed_by_token.ok()) sig = *signed_by_token;
    }
    return AuditPruneStatement(starts_at, prev, sig);
  }
  // The record `custody audit prune` writes before removing anything.
  uint64_t AppendPruneRecord(uint64_t starts_at, const std::string& prev, bool forged = false,
                             AuditResult result = AuditResult::kOk) {
    AuditEvent e = Event(0);
    e.action = kAuditPruneAction;
    e.version.reset();
    e.result = result;
    e.detail = "pruned seq 1 to " + std::to_string(starts_at - 1) + "; " + Statement(starts_at, prev, forged);
    auto seq = log_->Append(e);
    EXPECT_TRUE(seq.ok()) << seq.error().message();
    return seq.ok() ? *seq : 0;
  }
  std::string SegmentNo(int n) const {
    char buf[32];
    std::snprintf(buf, sizeof buf, "/audit-%06d.jsonl", n);
    return opts_.dir + buf;
  }
  std::vector<AuditPruneUnit> units_;
};

TEST_F(AuditPruneTest, EverySegmentButTheHeadsIsAUnitWithItsRecordsSpan) {
  ASSERT_EQ(units_.size(), 11u);  // seq 12's segment holds the head
  EXPECT_EQ(units_.front().name, "audit-000001.jsonl");
  EXPECT_EQ(units_[5].first_seq, 6u);
  EXPECT_EQ(units_[5].last_seq, 6u);
  EXPECT_EQ(units_[5].last_hash.size(), 64u);
  EXPECT_GT(units_[5].newest_unix_time, 0);
  EXPECT_GT(units_[5].bytes, 100u);
}

TEST_F(AuditPruneTest, APrunedLogVerifiesFromWhereItsPruneRecordSaysItStarts) {
  const uint64_t by = AppendPruneRecord(7, units_[5].last_hash);
  ASSERT_EQ(by, 13u);
  auto removed = log_->storage().Prune("", 6);
  ASSERT_TRUE(removed.ok()) << removed.error().message();
  EXPECT_EQ(*removed, 6u);  // records, one per segment here
  EXPECT_FALSE(std::filesystem::exists(SegmentNo(6)));
  EXPECT_TRUE(std::filesystem::exists(SegmentNo(7)));
  auto r = Verify();
  EXPECT_TRUE(r.intact) << r.problem;
  EXPECT_EQ(r.first_seq, 7u);
  EXPECT_EQ(r.pruned_by, 13u);
  EXPECT_EQ(r.records, 7u);  // 7..13
  EXPECT_EQ(r.last_checkpoint_seq, 10u);
  // The log goes on from its head, and stays verifiable.
  auto next = log_->Append(Event(14));
  ASSERT_TRUE(next.ok());
  EXPECT_EQ(*next, 14u);
  EXPECT_TRUE(Verify().intact);
  // The statement does not stretch to cover one segment more.
  std::filesystem::remove(SegmentNo(7));
  ExpectProblem("record seq 8 (audit-000008.jsonl:1)", "deleted: seq 1 to 7 missing before it");
}

TEST_F(AuditPruneTest, SegmentsRemovedWithoutAMatchingPruneRecordAreADeletion) {
  for (int n = 1; n <= 3; ++n) std::filesystem::remove(SegmentNo(n));
  ExpectProblem("record seq 4 (audit-000004.jsonl:1)", "deleted: seq 1 to 3 missing before it");
  // A prune record that names the start with another hash than the chain's.
  AppendPruneRecord(4, std::string(64, 'a'));
  ExpectProblem("record seq 4 (audit-000004.jsonl:1)", "deleted: seq 1 to 3 missing before it");
  // One that names a start before what is left does not cover it either:
  // records 3 and on were to stay.
  AppendPruneRecord(3, units_[1].last_hash);
  ExpectProblem("record seq 4 (audit-000004.jsonl:1)", "deleted: seq 1 to 3 missing before it");
  // A refused or failed prune says nothing about the start.
  AppendPruneRecord(4, units_[2].last_hash, false, AuditResult::kError);
  ExpectProblem("record seq 4 (audit-000004.jsonl:1)", "deleted: seq 1 to 3 missing before it");
}

// Record hashes have no key: whoever can write the log folder can append a
// well-formed prune record. Without the audit key's signature over the
// start it names, it is a forgery, and the removal stays a deletion.
TEST_F(AuditPruneTest, APruneRecordNotSignedByTheAuditKeyIsAForgery) {
  for (int n = 1; n <= 6; ++n) std::filesystem::remove(SegmentNo(n));
  // Signed by a key of the forger's own.
  const uint64_t forged = AppendPruneRecord(7, units_[5].last_hash, /*forged=*/true);
  ExpectProblem("record seq 7 (audit-000007.jsonl:1)",
                "deleted: seq 1 to 6 missing before it; the audit.prune record at seq " + std::to_string(forged) +
                    " says the log starts at seq 7, but its signature does not verify with the given key");
  // A signature copied from another statement (seq 4's start) does not fit.
  AuditEvent e = Event(0);
  e.action = kAuditPruneAction;
  const std::string real = Statement(4, units_[2].last_hash);
  e.detail = "the log now starts at seq 7 after hash " + units_[5].last_hash + real.substr(real.find("; signature"));
  ASSERT_TRUE(log_->Append(e).ok());
  ExpectProblem("record seq 7 (audit-000007.jsonl:1)", "but its signature does not verify with the given key");
  // Without the key the start cannot be taken on the record's word.
  AuditVerifyOptions o;
  o.dir = opts_.dir;
  auto r = VerifyAuditLog(o);
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->intact);
  EXPECT_NE(r->problem.find("deleted: seq 1 to 6"), std::string::npos) << r->problem;
  // Once signed by the audit key, the same start is a prune.
  AppendPruneRecord(7, units_[5].last_hash);
  auto good = Verify();
  EXPECT_TRUE(good.intact) << good.problem;
  EXPECT_EQ(good.first_seq, 7u);
}

TEST_F(AuditPruneTest, APruneCutShortVerifiesAndTheNextRunRemovesTheRest) {
  AppendPruneRecord(7, units_[5].last_hash);
  // As if the process died after removing three of the six segments.
  for (int n = 1; n <= 3; ++n) std::filesystem::remove(SegmentNo(n));
  auto r = Verify();
  EXPECT_TRUE(r.intact) << r.problem;
  EXPECT_EQ(r.first_seq, 4u);
  auto removed = log_->storage().Prune("", 6);
  ASSERT_TRUE(removed.ok());
  EXPECT_EQ(*removed, 3u);
  EXPECT_EQ(Verify().first_seq, 7u);
}

// A newest segment holding only a torn line (a crash mid-write) sends the
// head back to the segment before it, which must stay too.
TEST_F(AuditPruneTest, ASegmentWithOnlyATornLineDoesNotHoldTheHead) {
  std::ofstream(SegmentNo(13)) << "{\"seq\":13,\"time\":\"torn";
  auto removed = log_->storage().Prune("", ~uint64_t{0});
  ASSERT_TRUE(removed.ok()) << removed.error().message();
  EXPECT_EQ(*removed, 11u);
  EXPECT_TRUE(std::filesystem::exists(SegmentNo(12)));
  // The chain goes on from seq 12: the cut of the torn line is recorded
  // as seq 13, the event is 14.
  auto next = log_->Append(Event(13));
  ASSERT_TRUE(next.ok()) << next.error().message();
  EXPECT_EQ(*next, 14u);
}

TEST_F(AuditPruneTest, ThePruneNeverRemovesTheSegmentTheHeadIsReadFrom) {
  // An empty newest segment (a batch that made it and failed) sends the
  // head back to the one before: both stay.
  std::ofstream(SegmentNo(13)).flush();
  auto removed = log_->storage().Prune("", ~uint64_t{0});
  ASSERT_TRUE(removed.ok()) << removed.error().message();
  EXPECT_EQ(*removed, 11u);
  EXPECT_TRUE(std::filesystem::exists(SegmentNo(12)));
  EXPECT_TRUE(std::filesystem::exists(SegmentNo(13)));
  // The chain goes on at seq 13, not at 1.
  auto next = log_->Append(Event(13));
  ASSERT_TRUE(next.ok()) << next.error().message();
  EXPECT_EQ(*next, 13u);
}

// A prune beside a writer that keeps appending (custodyd's case): every
// appended record is kept, in one chain, and the log verifies from where the
// statement says it starts.
TEST_F(AuditPruneTest, APruneBesideAWriterThatKeepsAppendingLosesNothing) {
  AppendPruneRecord(7, units_[5].last_hash);  // seq 13
  std::atomic<bool> stop{false};
  std::vector<uint64_t> seqs;
  std::thread writer([&] {
    for (int i = 0; i < 2000 && !stop.load(); ++i) {
      auto s = log_->Append(Event(100 + i));
      if (!s.ok()) {
        ADD_FAILURE() << s.error().message();
        return;
      }
      seqs.push_back(*s);
    }
  });
  // Let the writer get going (new segments), then prune under it.
  while (!std::filesystem::exists(SegmentNo(20))) std::this_thread::sleep_for(std::chrono::microseconds(200));
  auto removed = log_->storage().Prune("", 6);
  stop = true;
  writer.join();
  ASSERT_TRUE(removed.ok()) << removed.error().message();
  EXPECT_EQ(*removed, 6u);
  ASSERT_FALSE(seqs.empty());
  for (size_t i = 0; i < seqs.size(); ++i) EXPECT_EQ(seqs[i], 14 + i);
  auto r = Verify();
  EXPECT_TRUE(r.intact) << r.problem;
  EXPECT_EQ(r.first_seq, 7u);
  EXPECT_EQ(r.last_seq, seqs.back());
}

// A reader that listed the segments just before a prune removed the oldest
// reads on from the first that is still there (the statement covers it);
// a segment missing in the middle is still an error, and so is a file the
// caller named that is not there.
TEST_F(AuditPruneTest, AReaderRacingAPruneReadsOnFromTheFirstSegmentLeft) {
  AppendPruneRecord(7, units_[5].last_hash);
  std::vector<std::string> listed;
  for (const auto& seg : AuditSegments(opts_.dir)) listed.push_back(opts_.dir + "/" + seg);
  ASSERT_TRUE(log_->storage().Prune("", 6).ok());
  std::vector<AuditChainLine> lines;
  ASSERT_TRUE(ReadAuditFiles(listed, [&](AuditChainLine&& l) { lines.push_back(std::move(l)); }, nullptr,
                             /*listed=*/true)
                  .ok());
  ASSERT_FALSE(lines.empty());
  EXPECT_EQ(lines.front().where, "audit-000007.jsonl:1");
  std::filesystem::remove(SegmentNo(9));
  Status gap = ReadAuditFiles(listed, [](AuditChainLine&&) {}, nullptr, /*listed=*/true);
  ASSERT_FALSE(gap.ok());
  EXPECT_NE(gap.error().message().find("audit-000009.jsonl"), std::string::npos) << gap.error().message();
  AuditVerifyOptions named;
  named.files = {SegmentNo(1), SegmentNo(7)};
  named.public_key_pem = pem_;
  auto r = VerifyAuditLog(named);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().category(), Category::kNotFound);
}

TEST(AuditPruneStatement, IsFoundInADetailOnlyWhole) {
  const std::string h(64, 'c');
  const std::vector<uint8_t> sig = {0x30, 0x02, 0x01, 0xff};
  auto st = FindAuditPruneStatement("policy v3; pruned seq 1 to 9; " + AuditPruneStatement(10, h, sig));
  ASSERT_TRUE(st.has_value());
  EXPECT_EQ(st->first_kept_seq, 10u);
  EXPECT_EQ(st->prev_hash, h);
  EXPECT_EQ(st->signature_b64, "MAIB/w==");
  EXPECT_FALSE(FindAuditPruneStatement("the log now starts at seq 10 after hash " + h));  // unsigned
  EXPECT_FALSE(FindAuditPruneStatement("the log now starts at seq 10 after hash " + h + "; signature "));
  EXPECT_FALSE(FindAuditPruneStatement("the log now starts at seq  after hash " + h + "; signature MAIB/w=="));
  EXPECT_FALSE(FindAuditPruneStatement("the log now starts at seq 0 after hash " + h + "; signature MAIB/w=="));
  EXPECT_FALSE(FindAuditPruneStatement("the log now starts at seq 010 after hash " + h + "; signature MAIB/w=="));
  EXPECT_FALSE(FindAuditPruneStatement("the log now starts at seq 10 after hash " + h.substr(1) + "; signature MAIB/w=="));
  EXPECT_FALSE(FindAuditPruneStatement("the log now starts at seq 10 after hash " + std::string(64, 'C') + "; signature MAIB/w=="));
  EXPECT_FALSE(FindAuditPruneStatement("the log now starts at seq 99999999999999999999 after hash " + h + "; signature MAIB/w=="));
}

TEST_F(AuditTest, ATailCutAfterTheLastCheckpointIsNotDetectable) {
  // Documented limit: records after the last checkpoint can be cut unseen.
  WriteStandard();
  auto lines = Lines(Segment());
  lines.resize(11);
  WriteLines(Segment(), lines);
  auto r = Verify();
  EXPECT_TRUE(r.intact) << r.problem;
  EXPECT_EQ(r.unsigned_tail, 1u);
}

TEST_F(AuditTest, RewritingAndRehashingTheChainIsCaughtByTheNextCheckpoint) {
  WriteStandard();
  auto lines = Lines(Segment());
  // Change seq 7 and re-hash it and every later record, fixing every prev.
  std::string h = Reseal(lines[6], "user:alice", "user:mallo");
  for (size_t i = 7; i < lines.size(); ++i) h = Reseal(lines[i], "", "", h);
  WriteLines(Segment(), lines);
  ExpectProblem("record seq 10 (audit-000001.jsonl:10)",
                "records after the previous checkpoint (seq 5) were altered and re-hashed");
}

TEST_F(AuditTest, AnotherTokensKeyDoesNotVerify) {
  WriteStandard();
  // Any other P-256 key stands for another token's audit key.
  auto lease = pool_->Acquire();
  auto k = hsm::GenerateEcKey(**lease, "not-the-audit-key");
  ASSERT_TRUE(k.ok());
  auto other_pem = P256PublicKeyPem(k->point);
  AuditVerifyOptions o;
  o.dir = opts_.dir;
  o.public_key_pem = *other_pem;
  auto r = VerifyAuditLog(o);
  EXPECT_FALSE(r->intact);
  EXPECT_NE(r->problem.find("does not verify with the given key"), std::string::npos) << r->problem;
}

// Threads of one process share one chain and one fsync per batch (group
// commit): observed, not assumed. The writer runs as its own process under
// an LD_PRELOAD shim (tests/support/trace_sync.cc) that logs every completed
// sync of an audit segment and makes each take 2 ms longer, as a slow disk
// would; threads that arrive while a sync is under way must share the next
// one. Without group commit every record gets its own sync.
TEST_F(AuditTest, ConcurrentThreadsShareOneChainAndBatchTheirFsyncs) {
  constexpr int kThreads = 8, kEach = 100, kRecords = kThreads * kEach;
  log_.reset();
  test::TempDir run;
  const std::string trace = run / "trace";
  std::string asan = std::getenv("ASAN_OPTIONS") ? std::getenv("ASAN_OPTIONS") : "";
  auto r = test::RunProgram(AUDIT_WRITER, {opts_.dir, std::to_string(kEach), "t", std::to_string(kThreads)},
                            {.env = {{"LD_PRELOAD", TRACE_SYNC},
                                     {"CUSTODY_TEST_TRACE", trace},
                                     {"CUSTODY_TEST_SYNC_DELAY_US", "2000"},
                                     {"ASAN_OPTIONS", asan + (asan.empty() ? "" : ":") + "verify_asan_link_order=0"}}});
  ASSERT_EQ(r.exit_code, 0) << r.err;

  auto rep = Verify();
  EXPECT_TRUE(rep.intact) << rep.problem;
  EXPECT_EQ(rep.records, static_cast<uint64_t>(kRecords));
  // Every record exactly once.
  std::set<std::string> details;
  auto all = ReadAuditLog(opts_.dir);
  ASSERT_TRUE(all.ok());
  for (const auto& rec : *all) details.insert(rec.event.detail);
  EXPECT_EQ(details.size(), static_cast<size_t>(kRecords)) << "no record lost or duplicated";

  // The syncs of audit segments that the writer's process made.
  int syncs = 0;
  for (const auto& line : Lines(trace)) {
    if (line.rfind("S ", 0) == 0 && line.find("/audit-") != std::string::npos) ++syncs;
  }
  EXPECT_GT(syncs, 0) << "the shim saw no sync: is the trace working?";
  EXPECT_LE(syncs, kRecords / 2) << syncs << " syncs for " << kRecords
                                 << " records written by " << kThreads << " threads: not batched";
}

// custodyd's path: requests append without waiting on a thread, mixed with
// ordinary appends; every callback runs once with its own seq, after its
// record is on disk, and closing the log drains what is still queued.
TEST_F(AuditTest, AsyncAppendsRunEachCallbackOnceAfterTheRecordIsWritten) {
  constexpr int kAsync = 300, kSync = 100;
  std::mutex mu;
  std::map<std::string, uint64_t> seen;  // request id -> seq
  std::atomic<int> errors{0}, unwritten{0};
  const std::string segment = Segment();
  {
    std::thread sync([&] {
      for (int i = 0; i < kSync; ++i) {
        if (!log_->Append(Event(100000 + i)).ok()) ++errors;
      }
    });
    for (int i = 0; i < kAsync; ++i) {
      AuditEvent e = Event(i);
      std::string id = e.request_id;
      log_->AppendAsync(e, [&, id](Result<uint64_t> r) {
        if (!r.ok()) {
          ++errors;
          return;
        }
        // Durable before the callback: the record is already in the file.
        if (test::ReadFile(segment).find("\"" + id + "\"") == std::string::npos) ++unwritten;
        std::lock_guard lock(mu);
        EXPECT_TRUE(seen.emplace(id, *r).second) << "callback ran twice for " << id;
      });
    }
    sync.join();
    log_.reset();  // drains the queue, runs the remaining callbacks
  }
  EXPECT_EQ(errors.load(), 0);
  EXPECT_EQ(unwritten.load(), 0);
  EXPECT_EQ(seen.size(), static_cast<size_t>(kAsync));
  std::set<uint64_t> seqs;
  for (const auto& [id, seq] : seen) seqs.insert(seq);
  EXPECT_EQ(seqs.size(), seen.size()) << "each record its own seq";
  auto r = Verify();
  EXPECT_TRUE(r.intact) << r.problem;
  EXPECT_EQ(r.records, static_cast<uint64_t>(kAsync + kSync));
}

// Issue 13: one record with bytes that are not UTF-8 once made nlohmann's
// dump throw inside the group-commit leader, which left the leader flag
// set: every later append (and custodyd's stop) waited forever. Now every
// field is written with such bytes as \xHH, the record and the ones after it
// are written, and the log verifies.
TEST_F(AuditTest, ARecordWithBytesThatAreNotUtf8IsWrittenEscapedAndTheLogGoesOn) {
  AuditEvent odd = Event(1);
  const std::string bad = "web\xff\xfe.internal\xc0\xaf";
  odd.identified_by = "tls client certificate san " + bad;
  odd.project = bad;
  odd.error = bad;
  odd.detail = std::string("nul\0byte", 8) + "\x01";
  // Synchronously, asynchronously, and again after it: none hangs or fails.
  auto first = log_->Append(odd);
  ASSERT_TRUE(first.ok()) << first.error().message();
  std::promise<Result<uint64_t>> async;
  log_->AppendAsync(odd, [&](Result<uint64_t> r) { async.set_value(std::move(r)); });
  auto fut = async.get_future();
  ASSERT_EQ(fut.wait_for(std::chrono::seconds(10)), std::future_status::ready) << "the async append never finished";
  EXPECT_TRUE(fut.get().ok());
  auto after = log_->Append(Event(3));
  ASSERT_TRUE(after.ok()) << after.error().message();
  EXPECT_EQ(*after, 3u);
  auto r = Verify();
  EXPECT_TRUE(r.intact) << r.problem;
  EXPECT_EQ(r.records, 3u);
  auto lines = Lines(Segment());
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_NE(lines[0].find(R"("project":"web\\xff\\xfe.internal\\xc0\\xaf")"), std::string::npos) << lines[0];
  auto parsed = ParseAuditRecord(lines[0]);
  ASSERT_TRUE(parsed.ok()) << parsed.error().message();
  EXPECT_EQ(parsed->event.project, "web\\xff\\xfe.internal\\xc0\\xaf");
  EXPECT_EQ(parsed->event.detail, std::string("nul\0byte", 8) + "\x01") << "valid UTF-8 is kept as it is";
}

// A callback that throws costs nobody else their answer: the other
// callbacks of its batch run, and the log keeps writing.
TEST_F(AuditTest, ACallbackThatThrowsDoesNotStopTheWriter) {
  std::atomic<int> ran{0};
  for (int i = 0; i < 20; ++i) {
    log_->AppendAsync(Event(i), [&, i](Result<uint64_t>) {
      ++ran;
      if (i % 5 == 0) throw std::runtime_error("a caller's bug");
    });
  }
  auto sync = log_->Append(Event(100));
  ASSERT_TRUE(sync.ok()) << sync.error().message();
  for (int i = 0; i < 200 && ran.load() < 20; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(ran.load(), 20);
  EXPECT_EQ(log_->failed_callbacks(), 4u);
  auto more = log_->Append(Event(101));
  EXPECT_TRUE(more.ok());
  log_.reset();
  EXPECT_TRUE(Verify().intact);
}

// A storage that throws something that is not a std::exception while
// armed: what a buggy storage or signer might let out of a batch.
class ThrowingStorage : public AuditStorage {
 public:
  explicit ThrowingStorage(std::unique_ptr<AuditStorage> real) : real_(std::move(real)) {}
  Status Append(std::chrono::steady_clock::time_point deadline, const Build& build) override {
    if (armed.load()) throw 42;
    return real_->Append(deadline, build);
  }
  Result<AuditHead> Head() override { return real_->Head(); }
  Result<std::vector<std::string>> Chains() override { return real_->Chains(); }
  Status Read(const std::string& chain, const std::function<void(AuditChainLine&&)>& each, bool* torn) override {
    return real_->Read(chain, each, torn);
  }
  Result<std::optional<std::pair<uint64_t, std::string>>> Witness(const std::string& chain) override {
    return real_->Witness(chain);
  }
  std::string Describe() const override { return real_->Describe(); }
  std::atomic<bool> armed{false};

 private:
  std::unique_ptr<AuditStorage> real_;
};

// A batch whose writing throws, whatever it throws, fails its own requests
// (the async ones through their callbacks, the waiting ones with an error)
// and nothing else: the log takes the next records, and the chain verifies.
TEST_F(AuditTest, ABatchThatThrowsFailsItsOwnRequestsAndTheLogGoesOn) {
  ThrowingStorage* st = nullptr;
  ASSERT_NO_FATAL_FAILURE(ReopenWith(std::make_unique<ThrowingStorage>(FileAuditStorage(opts_)), &st));
  ASSERT_TRUE(log_->Append(Event(1)).ok());
  st->armed = true;
  std::atomic<int> refused{0}, ran{0};
  for (int i = 0; i < 5; ++i) {
    log_->AppendAsync(Event(10 + i), [&](Result<uint64_t> r) {
      if (!r.ok() && r.error().message().find("could not be written") != std::string::npos) ++refused;
      ++ran;
    });
  }
  auto sync = log_->Append(Event(20));
  ASSERT_FALSE(sync.ok());
  EXPECT_NE(sync.error().message().find("the batch could not be written; refusing"), std::string::npos)
      << sync.error().message();
  for (int i = 0; i < 200 && ran.load() < 5; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(refused.load(), 5);
  EXPECT_GE(log_->failed_batches(), 1u);
  EXPECT_EQ(log_->write_in_progress_for().count(), 0) << "no write is under way once the batch failed";
  st->armed = false;
  auto after = log_->Append(Event(30));
  ASSERT_TRUE(after.ok()) << after.error().message();
  log_.reset();
  auto rep = Verify();
  EXPECT_TRUE(rep.intact) << rep.problem;
  EXPECT_EQ(rep.records, 2u) << "the two records written, none of the refused ones";
}

// A storage whose writes wait at a gate while it is held: a batch kept
// under way for as long as a test needs.
class GatedStorage : public ThrowingStorage {
 public:
  using ThrowingStorage::ThrowingStorage;
  Status Append(std::chrono::steady_clock::time_point deadline, const Build& build) override {
    entered.fetch_add(1);
    while (held.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    return ThrowingStorage::Append(deadline, build);
  }
  std::atomic<bool> held{false};
  std::atomic<int> entered{0};
};

// lead_if_idle (custodyd's GET alone in flight): on an idle log the record
// is written on the calling thread, durable before AppendAsync returns and
// its callback run there; while a batch is under way it is queued behind
// it and written by the writer thread, so the caller never waits.
TEST_F(AuditTest, ARecordLedOnAnIdleLogIsWrittenOnTheCallersThreadAndQueuedOtherwise) {
  GatedStorage* st = nullptr;
  ASSERT_NO_FATAL_FAILURE(ReopenWith(std::make_unique<GatedStorage>(FileAuditStorage(opts_)), &st));

  const auto me = std::this_thread::get_id();
  std::optional<std::thread::id> ran_on;
  uint64_t seq = 0;
  log_->AppendAsync(Event(1), [&](Result<uint64_t> r) {
    ran_on = std::this_thread::get_id();
    seq = r.ok() ? *r : 0;
  }, true);
  ASSERT_TRUE(ran_on.has_value()) << "the callback had not run when AppendAsync returned";
  EXPECT_EQ(*ran_on, me);
  EXPECT_EQ(seq, 1u);
  EXPECT_EQ(ReadAuditLog(opts_.dir)->size(), 1u) << "durable before AppendAsync returned";

  // A batch under way (a checkpoint-less synchronous append held at the gate).
  st->held = true;
  const int before = st->entered.load();
  std::thread leader([&] { EXPECT_TRUE(log_->Append(Event(2)).ok()); });
  for (int i = 0; i < 2000 && st->entered.load() == before; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  ASSERT_GT(st->entered.load(), before) << "the synchronous append never reached the storage";
  std::atomic<bool> done{false};
  std::thread::id queued_on;
  log_->AppendAsync(Event(3), [&](Result<uint64_t> r) {
    EXPECT_TRUE(r.ok());
    queued_on = std::this_thread::get_id();
    done = true;
  }, true);
  EXPECT_FALSE(done.load()) << "AppendAsync waited for a batch under way";
  st->held = false;
  leader.join();
  for (int i = 0; i < 500 && !done.load(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ASSERT_TRUE(done.load());
  EXPECT_NE(queued_on, me) << "a queued record is written by the writer thread";
  log_.reset();
  auto rep = Verify();
  EXPECT_TRUE(rep.intact) << rep.problem;
  EXPECT_EQ(rep.records, 3u);
}

// Group commit ([audit] group_commit_us): a GET announces its record
// before its store read and unseal (AuditLog::Announce). The writer holds
// a batch back until the records announced when it began have joined it,
// or group_commit_us has passed since the oldest was queued, so requests
// in flight together share one fsync.
class GroupCommitTest : public AuditTest {
 protected:
  // Reopens the log with `gather`; `done` is fulfilled by the callback.
  void Reopen(std::chrono::microseconds gather) {
    log_.reset();
    opts_.gather = gather;
    auto log = AuditLog::Open(opts_);
    ASSERT_TRUE(log.ok()) << log.error().message();
    log_ = std::move(*log);
  }
  AuditLog::Done Into(std::promise<Result<uint64_t>>& p) {
    return [&p](Result<uint64_t> r) { p.set_value(std::move(r)); };
  }
  static bool ArrivesWithin(std::future<Result<uint64_t>>& f, std::chrono::seconds s) {
    return f.wait_for(s) == std::future_status::ready;
  }
};

TEST_F(GroupCommitTest, RecordsAnnouncedTogetherShareOneBatch) {
  // A hold far longer than the test: only the arrival of every announced
  // record can end it in time.
  ASSERT_NO_FATAL_FAILURE(Reopen(std::chrono::seconds(60)));
  auto a1 = log_->Announce();
  auto a2 = log_->Announce();
  auto a3 = log_->Announce();
  std::promise<Result<uint64_t>> p1, p2, p3;
  auto f1 = p1.get_future(), f2 = p2.get_future(), f3 = p3.get_future();
  log_->AppendAsync(Event(1), Into(p1), false, &a1);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // the writer is holding by now
  EXPECT_EQ(f1.wait_for(std::chrono::milliseconds(0)), std::future_status::timeout)
      << "the first record was written alone while two more were announced";
  log_->AppendAsync(Event(2), Into(p2), false, &a2);
  log_->AppendAsync(Event(3), Into(p3), false, &a3);
  ASSERT_TRUE(ArrivesWithin(f1, std::chrono::seconds(20))) << "the batch was held after every record had come";
  ASSERT_TRUE(ArrivesWithin(f2, std::chrono::seconds(20)));
  ASSERT_TRUE(ArrivesWithin(f3, std::chrono::seconds(20)));
  EXPECT_EQ(*f1.get(), 1u);
  EXPECT_EQ(*f2.get(), 2u);
  EXPECT_EQ(*f3.get(), 3u);
  EXPECT_EQ(log_->batches_written(), 1u) << "three records, one fsync";
  EXPECT_EQ(log_->records_written(), 3u);
  log_.reset();
  auto rep = Verify();
  EXPECT_TRUE(rep.intact) << rep.problem;
  EXPECT_EQ(rep.records, 3u);
}

// A request that announced its record and then never appends it (its
// announcement destroyed) does not hold the others back.
TEST_F(GroupCommitTest, AnAnnouncementGivenUpEndsTheHold) {
  ASSERT_NO_FATAL_FAILURE(Reopen(std::chrono::seconds(60)));
  auto a1 = log_->Announce();
  std::promise<Result<uint64_t>> p1;
  auto f1 = p1.get_future();
  {
    auto gone = log_->Announce();
    log_->AppendAsync(Event(1), Into(p1), false, &a1);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    EXPECT_EQ(f1.wait_for(std::chrono::milliseconds(0)), std::future_status::timeout);
  }
  ASSERT_TRUE(ArrivesWithin(f1, std::chrono::seconds(20))) << "the hold outlived the announcement given up";
  EXPECT_EQ(*f1.get(), 1u);
}

// The hold is bounded: a record still announced (a GET whose token call
// hangs, say) holds the batch for group_commit_us at most; 0 holds nothing.
TEST_F(GroupCommitTest, AStragglerHoldsTheBatchForGroupCommitUsAtMost) {
  for (const auto gather : {std::chrono::microseconds(50000), std::chrono::microseconds(0)}) {
    SCOPED_TRACE("group_commit_us " + std::to_string(gather.count()));
    ASSERT_NO_FATAL_FAILURE(Reopen(gather));
    auto a1 = log_->Announce();
    auto straggler = log_->Announce();
    std::promise<Result<uint64_t>> p1;
    auto f1 = p1.get_future();
    log_->AppendAsync(Event(1), Into(p1), false, &a1);
    ASSERT_TRUE(ArrivesWithin(f1, std::chrono::seconds(20))) << "written while the straggler is still out";
    EXPECT_TRUE(f1.get().ok());
    EXPECT_EQ(log_->batches_written(), 1u);
  }
}

// ExpireQueued ([audit] timeout_ms): a record that has waited in the queue
// longer than the timeout is refused with kUnavailable and never written;
// a younger one is left alone; the log goes on and stays intact. (Held in
// the queue here by a long group-commit hold and a straggler; in custodyd
// by a batch whose fsync does not return: StuckAuditQueueServerTest.)
TEST_F(GroupCommitTest, ARecordQueuedPastTheTimeoutIsRefusedAndNeverWritten) {
  opts_.timeout = std::chrono::milliseconds(100);
  ASSERT_NO_FATAL_FAILURE(Reopen(std::chrono::seconds(60)));
  auto a1 = log_->Announce();
  std::promise<Result<uint64_t>> p1, p2;
  auto f1 = p1.get_future(), f2 = p2.get_future();
  {
    auto straggler = log_->Announce();
    log_->AppendAsync(Event(1), Into(p1), false, &a1);
    EXPECT_EQ(log_->ExpireQueued(), 0u) << "a record younger than the timeout was refused";
    std::this_thread::sleep_for(std::chrono::milliseconds(150));
    EXPECT_EQ(log_->ExpireQueued(), 1u);
    ASSERT_TRUE(ArrivesWithin(f1, std::chrono::seconds(5)));
    auto r1 = f1.get();
    ASSERT_FALSE(r1.ok()) << "expired, yet written as " << *r1;
    EXPECT_EQ(r1.error().category(), Category::kUnavailable);
    EXPECT_NE(r1.error().message().find("timed out waiting for the disk"), std::string::npos) << r1.error().message();
    EXPECT_EQ(log_->ExpireQueued(), 0u) << "refused twice";
  }
  log_->AppendAsync(Event(2), Into(p2));
  ASSERT_TRUE(ArrivesWithin(f2, std::chrono::seconds(20)));
  EXPECT_EQ(*f2.get(), 1u) << "the refused record took a sequence number";
  log_.reset();
  auto rep = Verify();
  EXPECT_TRUE(rep.intact) << rep.problem;
  EXPECT_EQ(rep.records, 1u);
}

TEST_F(AuditTest, ConcurrentProcessesShareOneChainAcrossSegments) {
  constexpr int kProcs = 4, kEach = 300;
  std::vector<std::thread> threads;
  std::vector<test::RunResult> results(kProcs);
  for (int p = 0; p < kProcs; ++p) {
    threads.emplace_back([&, p] {
      results[p] = test::RunProgram(AUDIT_WRITER, {opts_.dir, std::to_string(kEach), "p" + std::to_string(p)}, {});
    });
  }
  for (auto& t : threads) t.join();
  for (const auto& r : results) ASSERT_EQ(r.exit_code, 0) << r.err;
  auto rep = Verify();
  EXPECT_TRUE(rep.intact) << rep.problem;
  EXPECT_EQ(rep.records, static_cast<uint64_t>(kProcs * kEach));
  EXPECT_GT(AuditSegments(opts_.dir).size(), 1u) << "the writers rotate to new segments at 64 KiB";
  std::set<std::string> details;
  auto all = ReadAuditLog(opts_.dir);
  for (const auto& rec : *all) details.insert(rec.event.detail);
  EXPECT_EQ(details.size(), static_cast<size_t>(kProcs * kEach)) << "no record lost or duplicated";
}

// The log keeps its lock file open between batches and only takes the
// flock on it per batch. A .lock that was deleted and made again (by an
// operator, a clean-up job) must be the one it locks: here another holder
// has the new file locked, and the append must wait for it (and give up at
// its timeout) instead of writing beside it under the old, unlinked file.
TEST_F(AuditTest, AReplacedLockFileIsTheOneTheNextBatchWaitsFor) {
  opts_.timeout = std::chrono::milliseconds(300);
  auto log = AuditLog::Open(opts_);
  ASSERT_TRUE(log.ok()) << log.error().message();
  ASSERT_TRUE((*log)->Append(Event(1)).ok());
  const std::string lock = opts_.dir + "/.lock";
  ASSERT_EQ(::unlink(lock.c_str()), 0);
  int held = ::open(lock.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  ASSERT_GE(held, 0);
  ASSERT_EQ(::flock(held, LOCK_EX | LOCK_NB), 0);
  auto refused = (*log)->Append(Event(2));
  ASSERT_FALSE(refused.ok()) << "written while another holder had the lock file";
  EXPECT_NE(refused.error().message().find("another process has held " + lock), std::string::npos)
      << refused.error().message();
  ::close(held);
  auto s = (*log)->Append(Event(3));
  ASSERT_TRUE(s.ok()) << s.error().message();
  EXPECT_EQ(*s, 2u);
  auto rep = Verify();
  EXPECT_TRUE(rep.intact) << rep.problem;
  EXPECT_EQ(rep.records, 2u);
}

// The newest segment also stays open between batches. A segment replaced by
// a copy (another inode at the same name, as a restore or an rsync leaves
// it) must get the next records, not the file that was moved away.
TEST_F(AuditTest, ASegmentReplacedBetweenBatchesGetsTheNextRecords) {
  auto log = AuditLog::Open(opts_);
  ASSERT_TRUE(log.ok()) << log.error().message();
  ASSERT_TRUE((*log)->Append(Event(1)).ok());
  ASSERT_TRUE((*log)->Append(Event(2)).ok());
  const std::string moved = opts_.dir + "/moved.jsonl.bak";
  std::filesystem::copy_file(Segment(), moved);
  std::filesystem::rename(moved, Segment());  // same bytes, another inode
  auto s = (*log)->Append(Event(3));
  ASSERT_TRUE(s.ok()) << s.error().message();
  EXPECT_EQ(*s, 3u);
  auto all = ReadAuditLog(opts_.dir);
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), 3u) << "the third record went to the file that was replaced";
  EXPECT_EQ(all->back().seq, 3u);
  auto rep = Verify();
  EXPECT_TRUE(rep.intact) << rep.problem;
}

// Request ids are counted from a random prefix per process: 16 lower-case
// hex digits, none repeated across threads, and a forked child's are its own.
TEST(RequestIds, AreSixteenHexDigitsUniqueAcrossThreadsAndForks) {
  constexpr int kThreads = 4, kEach = 5000;
  std::vector<std::vector<std::string>> got(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kEach; ++i) got[t].push_back(NewRequestId());
    });
  }
  for (auto& t : threads) t.join();
  std::set<std::string> all;
  for (const auto& v : got) {
    for (const auto& id : v) {
      ASSERT_TRUE(IsLowerHex(id, 16)) << id;
      all.insert(id);
    }
  }
  EXPECT_EQ(all.size(), static_cast<size_t>(kThreads * kEach)) << "a request id was given twice";
  // A child's next id does not share the parent's prefix (the first 8 digits).
  const std::string parent = NewRequestId();
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  pid_t pid = ::fork();
  if (pid == 0) {
    const std::string id = NewRequestId();
    (void)!::write(fds[1], id.data(), id.size());
    ::_exit(0);
  }
  ::close(fds[1]);
  char buf[32] = {};
  ssize_t n = ::read(fds[0], buf, sizeof buf);
  ::close(fds[0]);
  ::waitpid(pid, nullptr, 0);
  ASSERT_EQ(n, 16);
  const std::string child(buf, 16);
  EXPECT_NE(child.substr(0, 8), parent.substr(0, 8)) << parent << " / " << child;
}

TEST_F(AuditTest, KillNineMidWriteLeavesAVerifiableLogThatContinuesCleanly) {
  std::mt19937 rng(12345);
  uint64_t before = 0;
  for (int round = 0; round < 6; ++round) {
    pid_t pid = ::fork();
    if (pid == 0) {
      ::execl(AUDIT_WRITER, AUDIT_WRITER, opts_.dir.c_str(), "1000000", "crash", nullptr);
      ::_exit(127);
    }
    // Wait until the writer is writing (start-up is slow under sanitizers
    // and load), then kill it at a random moment mid-stream.
    auto size = [&] {
      std::error_code ec;
      uintmax_t total = 0;
      for (const auto& seg : AuditSegments(opts_.dir)) total += std::filesystem::file_size(opts_.dir + "/" + seg, ec);
      return total;
    };
    uintmax_t start = size();
    for (int i = 0; i < 400 && size() == start; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    std::this_thread::sleep_for(std::chrono::milliseconds(rng() % 60));
    ::kill(pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
    ASSERT_TRUE(WIFSIGNALED(status));
    auto r = Verify();
    EXPECT_TRUE(r.intact) << "round " << round << ": " << r.problem;
    EXPECT_GT(r.records, before);
    // The next writer repairs any torn tail and continues the chain.
    auto next = AuditLog::Open(opts_);
    ASSERT_TRUE(next.ok()) << next.error().message();
    ASSERT_TRUE((*next)->Append(Event(round)).ok());
    auto after = Verify();
    EXPECT_TRUE(after.intact) << after.problem;
    EXPECT_FALSE(after.torn_tail);
    before = after.records;
  }
}

// A kill -9 at a random moment rarely lands inside a record (each record
// is one small write), so the test above cannot show a repair. Here the
// crash is placed: a shim lets the writer's 5th write to the segment put
// down only half its bytes, then kills the process with SIGKILL. The torn
// line must be reported, then cut and recorded by the next writer.
TEST_F(AuditTest, AWriterKilledHalfwayThroughARecordLeavesATornLineTheNextOneRepairs) {
  log_.reset();
  std::string asan = std::getenv("ASAN_OPTIONS") ? std::getenv("ASAN_OPTIONS") : "";
  std::vector<std::string> env = {std::string("LD_PRELOAD=") + TEAR_WRITE, "CUSTODY_TEST_TEAR_AT=5",
                                  "ASAN_OPTIONS=" + asan + (asan.empty() ? "" : ":") + "verify_asan_link_order=0"};
  std::vector<char*> envp;
  for (auto& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);
  pid_t pid = ::fork();
  if (pid == 0) {
    ::execle(AUDIT_WRITER, AUDIT_WRITER, opts_.dir.c_str(), "100", "torn", nullptr, envp.data());
    ::_exit(127);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << "the writer was not killed mid-record";
  auto r = Verify();
  EXPECT_TRUE(r.intact) << r.problem;
  EXPECT_TRUE(r.torn_tail) << "the crash left no torn line";
  EXPECT_EQ(r.records, 4u) << "four whole records before the torn one";

  auto next = AuditLog::Open(opts_);
  ASSERT_TRUE(next.ok()) << next.error().message();
  ASSERT_TRUE((*next)->Append(Event(7)).ok());
  auto after = Verify();
  EXPECT_TRUE(after.intact) << after.problem;
  EXPECT_FALSE(after.torn_tail);
  auto recs = *ReadAuditLog(opts_.dir);
  ASSERT_EQ(recs.size(), 6u);
  EXPECT_EQ(recs[4].type, "repair");
  EXPECT_NE(recs[4].event.detail.find("of a record torn by a crash"), std::string::npos) << recs[4].event.detail;
}

TEST_F(AuditTest, ATornLastLineIsReportedThenRepairedAndRecorded) {
  WriteStandard();
  std::string seg = Segment();
  std::string data = test::ReadFile(seg);
  std::string torn = Lines(seg)[3].substr(0, 50);  // half a record, no newline
  test::WriteFile(seg, data + torn);
  auto r = Verify();
  EXPECT_TRUE(r.intact) << r.problem;
  EXPECT_TRUE(r.torn_tail);
  EXPECT_EQ(r.records, 12u);
  ASSERT_TRUE(log_->Append(Event(99)).ok());
  auto after = Verify();
  EXPECT_TRUE(after.intact) << after.problem;
  EXPECT_FALSE(after.torn_tail);
  auto recs = *ReadAuditLog(opts_.dir);
  ASSERT_EQ(recs.size(), 14u);
  EXPECT_EQ(recs[12].type, "repair");
  EXPECT_EQ(recs[12].event.detail, "removed 50 bytes of a record torn by a crash");
}

TEST_F(AuditTest, AFullDiskRefusesTheAppendAndLeavesNoPartialRecord) {
  WriteStandard();
  std::string before = test::ReadFile(Segment());
  pid_t pid = ::fork();
  if (pid == 0) {
    // The file may not grow: writes fail as on a full disk (EFBIG).
    ::signal(SIGXFSZ, SIG_IGN);
    struct rlimit rl {static_cast<rlim_t>(before.size()), static_cast<rlim_t>(before.size())};
    ::setrlimit(RLIMIT_FSIZE, &rl);
    auto log = AuditLog::Open(opts_);
    auto r = (*log)->Append(Event(1));
    ::_exit(!r.ok() && r.error().category() == Category::kUnavailable &&
                    r.error().message().find("cannot write") != std::string::npos
                ? 0
                : 1);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "append must fail with kUnavailable";
  EXPECT_EQ(test::ReadFile(Segment()), before) << "nothing half-written";
  EXPECT_TRUE(Verify().intact);
}

TEST_F(AuditTest, AnUnwritableLogFolderIsAnError) {
  AuditOptions o;
  o.dir = dir_ / "not-a-dir";
  test::WriteFile(o.dir, "x");
  auto log = AuditLog::Open(o);
  ASSERT_FALSE(log.ok());
  EXPECT_EQ(log.error().category(), Category::kUnavailable);
}

TEST(AuditRecord, ParserRefusesDamage) {
  EXPECT_FALSE(ParseAuditRecord("").ok());
  EXPECT_FALSE(ParseAuditRecord("{}").ok());
  EXPECT_FALSE(ParseAuditRecord(std::string(70000, 'x')).ok());
  std::string fake = "{\"seq\":1,\"hash\":\"" + std::string(64, 'z') + "\"}";
  EXPECT_FALSE(ParseAuditRecord(fake).ok());
}

}  // namespace
}  // namespace custody::core
