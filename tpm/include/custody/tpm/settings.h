// [token] of custody.toml for backend = "tpm".
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace custody::tpm {

struct TpmSettings {
  std::string tcti;           // "device:/dev/tpmrm0", "swtpm:host=...,port=...", "tabrmd"
  std::vector<uint8_t> pcrs;  // bind new KEKs to these SHA-256 PCRs
  bool persist_srk = false;   // make the SRK persistent at 0x81000001 if absent
  std::string srk_name;       // the SRK's Name at init: a TPM with another SRK is refused
  int kek_cache_seconds = 0;  // keep unsealed KEKs in locked memory this long

  bool operator==(const TpmSettings&) const = default;
};

}  // namespace custody::tpm
