#!/bin/sh
echo "hello from kiln, running as $(id -un) on $(uname -m)"
