#!/bin/sh
# Greets whoever is named first on the command line.
echo "hello, $1"
