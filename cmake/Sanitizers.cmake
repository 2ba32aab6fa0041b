# CUSTODY_SANITIZERS="address;undefined" adds -fsanitize=address,undefined to
# everything, and makes every sanitizer finding fatal (no recovery), so a test
# that trips one fails instead of printing and passing.
if(CUSTODY_SANITIZERS)
  list(JOIN CUSTODY_SANITIZERS "," _custody_san)
  add_compile_options(-fsanitize=${_custody_san} -fno-sanitize-recover=all -fno-omit-frame-pointer)
  add_link_options(-fsanitize=${_custody_san})
  # Executables of the ASan+UBSan build are linked without PIE. The sanitizers'
  # metadata (globals, check-site locations) makes 1.4 to 2.2 million
  # relative relocations per binary, which the loader applies, page fault by
  # page fault, at every start: 0.17 s of a 0.36 s `custody attest verify`
  # here. The test suite starts thousands of these processes (each CLI call,
  # each custodyd, each test), so this halves their start. Only these test
  # builds: the release build, which is what gets installed, stays PIE.
  if("address" IN_LIST CUSTODY_SANITIZERS)
    add_link_options($<$<STREQUAL:$<TARGET_PROPERTY:TYPE>,EXECUTABLE>:-no-pie>)
  endif()
endif()
