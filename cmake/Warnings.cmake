# custody_warnings: an interface target every custody target links, so the
# warning set is defined once.
add_library(custody_warnings INTERFACE)
target_compile_options(custody_warnings INTERFACE
  -Wall -Wextra -Wpedantic -Wshadow -Wnon-virtual-dtor -Wcast-align -Wunused
  -Woverloaded-virtual -Wformat=2 -Wimplicit-fallthrough
  $<$<BOOL:${CUSTODY_WERROR}>:-Werror>)
