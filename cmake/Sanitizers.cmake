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
    # With GCC (the dev preset), global variables get no redzones. Each
    # instrumented global is registered with the ASan runtime, and its
    # shadow poisoned, at every start: custody-full has so many (every
    # string literal of every header it includes) that this was half of its
    # 0.20 s start, and its .data 62 MB instead of 15 MB. Heap, stack and
    # use-after-free checks are unchanged. Overflows of a global table by
    # untrusted bytes stay covered where such bytes enter: the fuzz preset
    # (clang, ci/fuzz.sh) keeps global instrumentation.
    if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
      add_compile_options(--param=asan-globals=0)
    endif()
  endif()
endif()
