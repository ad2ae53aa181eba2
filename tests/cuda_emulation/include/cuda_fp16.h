// Stand-in for the CUDA header of the same name in the CPU emulation (see ../cuda_emulation.h).
#pragma once
#include "../cuda_emulation.h"
