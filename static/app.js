// Small behaviours that need script; pages work without it.
"use strict";
