"""`python -m deltapack --cmake-dir` (and --include-dir, --lib-dir, --pkgconfig-dir): where this install keeps
the C/C++ library for builds against it, e.g. `cmake -Ddeltapack_DIR=$(python -m deltapack --cmake-dir)` or
`PKG_CONFIG_PATH=$(python -m deltapack --pkgconfig-dir) pkg-config --cflags --libs deltapack`.
Anything else is the command line (`python -m deltapack demo` = `deltapack demo`). Imports nothing heavy
before it knows which: the directory flags need only the standard library."""
import os
import sys

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
DIRS = {  # flag -> directory inside the installed package (CMakeLists.txt, SKBUILD install rules)
    "--include-dir": "include",
    "--lib-dir": "lib",
    "--cmake-dir": os.path.join("lib", "cmake", "deltapack"),
    "--pkgconfig-dir": os.path.join("lib", "pkgconfig"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0] in DIRS:
        path = os.path.join(_PACKAGE, DIRS[argv[0]])
        if not os.path.isdir(path):  # e.g. an editable install, whose build tree holds the library
            print(f"python -m deltapack {argv[0]}: {path} does not exist in this install "
                  "(a wheel or `pip install .` has it)", file=sys.stderr)
            return 1
        print(path)
        return 0
    from deltapack.cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
