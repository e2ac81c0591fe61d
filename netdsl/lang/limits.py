"""How large compile-time values and elaboration may grow (docs/language.md, "Limits").

Each limit is far above anything a real network needs; a spec that reaches one is a
mistake (a list doubled in a loop, a count typed with too many digits) and gets a
located error instead of running the machine out of memory or time.
"""

MAX_SOURCE_BYTES = 1 << 20        # one .net file (the largest spec here is ~4 KB; Lark parses ~60 KB/s)
MAX_TOTAL_SOURCE_BYTES = 4 << 20   # a spec and all it imports
MAX_IMPORT_DEPTH = 64              # a chain of imports
MAX_INT = 2 ** 63 - 1              # compile-time integers are 64-bit (they end up in int64 arrays)
MAX_EXPONENT = 4096                # `a ** b` with |a| > 1 (checked before computing it)
MAX_LIST = 1_000_000               # items in one list or tuple
MAX_STRING = 1_000_000             # characters in one string
MAX_ELEMENTS = 2 ** 63 - 1         # elements of one tensor, counting the fixed dimensions
MAX_DIM_DEGREE = 64                # a symbolic dimension's degree (N*N*... factors in one term)
MAX_DIM_TERMS = 1_000              # terms in a symbolic dimension
MAX_DIM_TEXT = 10_000              # characters in its printed form (floor-divisions nest)
MAX_WORK = 50_000_000              # items of lists and characters of strings built, in all
MAX_DEPTH = 64                     # blocks and steps nested in one another
MAX_ITERATIONS = 100_000           # loop iterations unrolled per network, in all
MAX_CALLS = 100_000                # block and step calls per network, in all
MAX_NODES = 200_000                # operator nodes per network (scan bodies included)
