function spm_unlink(varargin)
% Stand-in for SPM's MEX spm_unlink (compiled for MATLAB only): delete files, ignore missing.
for i = 1:numel(varargin)
    if exist(varargin{i}, 'file'), delete(varargin{i}); end
end
