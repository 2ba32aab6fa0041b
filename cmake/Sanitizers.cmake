# CUSTODY_SANITIZERS="address;undefined" adds -fsanitize=address,undefined to
# everything, and makes every sanitizer finding fatal (no recovery), so a test
# that trips one fails instead of printing and passing.
if(CUSTODY_SANITIZERS)
  list(JOIN CUSTODY_SANITIZERS "," _custody_san)
  add_compile_options(-fsanitize=${_custody_san} -fno-sanitize-recover=all -fno-omit-frame-pointer)
  add_link_options(-fsanitize=${_custody_san})
endif()
