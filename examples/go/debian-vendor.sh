#!/bin/sh
# Builds vendor/ for the module in directory $1 from Debian's Go packages (/usr/share/gocode),
# so that `go build -mod=vendor` builds it as a module with nothing downloaded. Each module its
# go.mod requires is linked from Debian's sources and listed in vendor/modules.txt with the
# version go.mod names (Debian's own) and the packages it holds.
set -eu
module_dir=$1
sources=${GOCODE:-/usr/share/gocode/src}
vendor=$module_dir/vendor
rm -rf "$vendor" && mkdir -p "$vendor"
awk '/^\t[a-z]/ {print $1, $2}' "$module_dir/go.mod" | while read -r path version; do
  [ -d "$sources/$path" ] || { echo "$path: not in $sources (make example-deps)" >&2; exit 1; }
  mkdir -p "$vendor/$(dirname "$path")"
  ln -s "$sources/$path" "$vendor/$path"
  # A module's go version sets the language features its packages may use.
  go_version=$(awk '$1 == "go" {print $2}' "$sources/$path/go.mod" 2>/dev/null || true)
  printf '# %s %s\n## explicit%s\n' "$path" "$version" "${go_version:+; go $go_version}"
  (cd "$sources" && find "$path" -name '*.go' ! -name '*_test.go' ! -path '*/testdata/*' \
    -printf '%h\n' | sort -u)
done >"$vendor/modules.txt"
